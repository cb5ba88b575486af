"""The package's layout: every module imports only modules below it (no import cycles), and the
refinement chain and the attention map are defined once, in refiner.functional, for the reference
modules, the kernels and the analysis alike."""
import ast
import copy
import re
import sys
from pathlib import Path

import pytest
import timm
import torch

import refiner  # noqa: F401  (registers the models)
from refiner import functional as RF
from refiner.analysis.attention_maps import attention_maps
from refiner.kernels import set_kernels

SRC = Path(refiner.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports() -> dict:
    """Each refiner module -> the refiner modules it imports (anywhere in its body, lazy imports too)."""
    modules = {_module_name(p): p for p in SRC.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
                    base = f'{anchor}.{base}' if base else anchor
                if not base.startswith('refiner'):
                    continue
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    edges.add(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base)
        graph[name] = edges - {name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert 'refiner.kernels.refinement' in graph and 'refiner.functional' in graph['refiner.kernels.refinement']
    state, cycles = {}, []

    def visit(m, path):
        state[m] = 'open'
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 'open':
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], ' ; '.join(' -> '.join(c) for c in cycles)


def test_the_method_and_the_kernels_sit_below_everything_else():
    graph = _imports()
    assert graph['refiner.functional'] == set()
    for name, edges in graph.items():
        if name.startswith('refiner.kernels'):
            assert all(e == 'refiner.functional' or e.startswith('refiner.kernels') for e in edges), (name, edges)
        if name.startswith('refiner.layers'):
            assert all(e.split('.')[1] in ('functional', 'kernels', 'layers') for e in edges), (name, edges)


# ------------------------------------------------------------------------ every level, as documented

LAYOUT = SRC.parents[1] / 'docs' / 'layout.md'


def _layout_table():
    """docs/layout.md's table, bottom row first: [(file or package/, [what it may import])]."""
    rows = []
    for line in LAYOUT.read_text().splitlines():
        if line.startswith('| `'):
            cells = [c.strip() for c in line.strip('|').split('|')]
            rows.append((cells[0].strip('`'), re.findall(r'`([^`]+)`', cells[2])))
    return rows


def _path_of(module: str) -> str:
    """refiner.ablate.plan -> 'ablate/plan.py'; refiner.models -> 'models/__init__.py'; refiner -> '__init__.py'."""
    parts = module.split('.')[1:]
    path = SRC.joinpath(*parts)
    return '/'.join(parts + ['__init__.py']) if path.is_dir() else '/'.join(parts) + '.py'


def _matches(path: str, entry: str) -> bool:
    return path.startswith(entry) if entry.endswith('/') else path == entry


def test_every_module_imports_only_what_docs_layout_allows_from_the_rows_above():
    """docs/layout.md lists every module bottom-up with what it may import: each import of the code
    must be allowed there and come from a row above (a package row, ``kernels/``, covers its modules,
    which import one another without cycles)."""
    rows = _layout_table()
    assert rows, 'docs/layout.md has no table'
    graph = _imports()
    row_of = {}
    for module in graph:
        path = _path_of(module)
        found = [i for i, (entry, _) in enumerate(rows) if _matches(path, entry)]
        assert found, f'{path} is not in docs/layout.md'
        row_of[module] = found[0]
    for entry, _ in rows:
        assert any(_matches(_path_of(m), entry) for m in graph), f'docs/layout.md lists {entry}, which is not there'
    problems = []
    for module, edges in sorted(graph.items()):
        entry, allowed = rows[row_of[module]]
        for imported in sorted(edges):
            path = _path_of(imported)
            same_package = entry.endswith('/') and _matches(path, entry)
            if not same_package and row_of[imported] >= row_of[module]:
                problems.append(f'{_path_of(module)} imports {path}, which is not in a row above it')
            elif not any(_matches(path, a) for a in allowed):
                problems.append(f'{_path_of(module)} imports {path}, which docs/layout.md does not allow it')
    assert problems == [], '\n'.join(problems)


# modules not split yet, and why; each leaves this list when it is
NOT_SPLIT_YET: dict = {}


def test_each_module_says_its_one_job_and_stays_short():
    """Each module's first docstring line says its job; none grows past ~450 lines."""
    for path in sorted(SRC.rglob('*.py')):
        name = str(path.relative_to(SRC))
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f'{name} has no docstring saying its job'
        lines = len(path.read_text().splitlines())
        assert lines <= 450 or name in NOT_SPLIT_YET, f'{name} has {lines} lines: split it by job'


# ------------------------------------------------------------------------ one chain definition

def _tiny():
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', num_classes=5, img_size=16).double()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # eval statistics unlike the batch's
            m.running_mean.data = torch.rand(m.num_features, generator=g, dtype=torch.double) * 0.2
            m.running_var.data = torch.rand(m.num_features, generator=g, dtype=torch.double) + 0.5
    return model


def _three_uses(model):
    """What the reference forward, the kernels (forward and the recomputing backward) and the
    analysis compute: reference logits, kernel logits and gradients, the analysis' stages."""
    x = torch.randn(3, 3, 16, 16, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model).train()
    set_kernels(False, ref)
    kernel = copy.deepcopy(model).train()
    out = kernel(x)
    grads = torch.autograd.grad(out.square().sum(), list(kernel.parameters()))
    blocks = attention_maps(copy.deepcopy(model), x)
    stages = torch.cat([b[k].flatten() for b in blocks for k in ('expanded', 'local', 'reduced') if k in b])
    return ref(x), out, torch.cat([g.flatten() for g in grads]), stages


@pytest.mark.parametrize('stage', ['expand', 'local_conv', 'reduce', 'activation'])
def test_changing_a_stage_changes_the_reference_the_kernels_and_the_analysis(monkeypatch, stage):
    model = _tiny()
    before = _three_uses(model)
    original = getattr(RF, stage)
    callers = set()

    def changed(t, *args, **kwargs):  # a non-affine change that no BatchNorm absorbs
        name = sys._getframe(1).f_globals['__name__']
        callers.add((name, torch._C._current_graph_task_id() != -1))  # (caller, during backward)
        out = original(t, *args, **kwargs)
        return out.tanh_() if kwargs.get('out') is not None else out.tanh()

    monkeypatch.setattr(RF, stage, changed)
    after = _three_uses(model)
    for what, b, a in zip(('reference forward', 'kernel forward', 'kernel gradients', 'analysis stages'),
                          before, after):
        assert not torch.allclose(a, b), f'changing refiner.functional.{stage} did not change the {what}'
    # the kernel calls the stage in its forward passes and again in backward (its recomputation)
    assert ('refiner.kernels.refinement', False) in callers and ('refiner.kernels.refinement', True) in callers
    assert ('refiner.layers.dla', False) in callers  # the reference forward and the analysis' stages


def test_the_attention_map_is_defined_once(monkeypatch):
    """Refiner-ViT's reference and kernel attention, and the analysis' map of a timm ViT block,
    all compute A with refiner.functional.attention_map."""
    original, callers = RF.attention_map, set()

    def spy(*args, **kwargs):
        callers.add(sys._getframe(1).f_globals['__name__'])
        return original(*args, **kwargs)

    monkeypatch.setattr(RF, 'attention_map', spy)
    model = _tiny().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)
    model(x).sum().backward()
    set_kernels(False, model)
    model(x)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, num_classes=5, depth=2)
    attention_maps(vit, torch.randn(2, 3, 16, 16))
    assert callers == {'refiner.kernels.handover', 'refiner.layers.attention', 'refiner.analysis.attention_maps'}
