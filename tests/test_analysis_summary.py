"""refiner analyze summary: several cka.json / attention.json results combined into mean ± std per
model, each difference from the reference marked as within the seed spread or not, and its errors."""
import json
import statistics

import pytest

import refiner  # noqa: F401  (registers the models)
from refiner.analysis.summary import SummaryError, read_analyses, summarize
from refiner.cli import main
from refiner.spread import compare_to, format_stat, seed_stats

TINY_REFINER = '{patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2}'


def _cka(first_last, at, blocks=4, data='fashion_mnist'):
    """A cka.json payload with one model per entry of ``first_last`` / ``at`` (label -> value)."""
    models = {}
    for label, c0 in first_last.items():
        curve = [c0] + [c0 + (1 - c0) * (i / (blocks - 1)) for i in range(1, blocks)]
        models[label] = {'cka_with_last': curve, 'cka_first_last': c0,
                         'normalised_at_depth': {'0.25': at[label][0], '0.50': at[label][1], '0.75': at[label][2]}}
    return {'estimator': 'minibatch linear CKA', 'data': data, 'split': 'held-out', 'dataset': 'Fashion-MNIST',
            'num_images': 1000, 'models': models}


def _attention(rows, data='fashion_mnist'):
    """An attention.json payload; ``rows``: label -> list of (kind, head_sim, before, cross)."""
    return {'metrics': {}, 'data': data, 'split': 'held-out', 'dataset': 'Fashion-MNIST', 'num_images': 256, 'models': {
        label: {'blocks': [{'block': i, 'kind': kind, 'head_similarity': h, 'head_similarity_before': b,
                            'cross_block_similarity': c} for i, (kind, h, b, c) in enumerate(blocks)]}
        for label, blocks in rows.items()}}


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _three_seeds(tmp_path):
    """Three seeds' analyses of refiner and vit (resnet in seed 0's CKA only), in folders s0..s2."""
    fl = {'refiner': [0.60, 0.70, 0.65], 'vit': [0.80, 0.90, 0.85]}
    for s in range(3):
        at = {'refiner': (0.1 * s, 0.2, 0.3), 'vit': (0.2 + 0.1 * s, 0.5, 0.8), 'resnet18': (0.1, 0.3, 0.4)}
        first_last = {'refiner': fl['refiner'][s], 'vit': fl['vit'][s]}
        if s == 0:
            first_last['resnet18'] = 0.6
        _write(tmp_path / f's{s}' / 'cka' / 'cka.json', _cka(first_last, at))
        _write(tmp_path / f's{s}' / 'attention' / 'attention.json', _attention({
            'refiner': [('attention', 0.4, None, None), ('refining', -0.1 * s, 0.4, 0.02 * s)],
            'vit': [('attention', 0.2, None, None), ('attention', 0.1 + 0.01 * s, None, 0.15)],
            # refine_vit's blocks refine their own map
            'deit_refined': [('attention+refine', 0.1, 0.3, None), ('attention', 0.2, None, 0.1)]},
            data='fashion_mnist:/elsewhere' if s == 2 else 'fashion_mnist'))
    return fl


def test_seed_statistics_and_the_spread_rule():
    a, b = seed_stats([1.0, 2.0, 3.0]), seed_stats([1.5, 2.5, 3.5])
    assert a['mean'] == 2.0 and a['std'] == pytest.approx(1.0) and a['n'] == 3
    assert compare_to(b, a)['within_spread'] is True  # 0.5 < 1
    far = compare_to(seed_stats([5.0, 5.1]), a)
    assert far['diff'] == pytest.approx(3.05) and far['within_spread'] is False
    single = compare_to(seed_stats([4.0]), a)
    assert single['std'] is None and single['within_spread'] is None
    assert format_stat(compare_to(b, a)) == '2.50 ± 1.00 (+0.50, within spread)'
    assert format_stat(far) == '5.05 ± 0.07 (+3.05)' and format_stat(single) == '4.00 (+2.00, one seed)'
    assert compare_to(a, None)['diff'] is None
    at_the_edge = compare_to(seed_stats([2.0, 3.0, 4.0]), a)  # a difference equal to the spread is outside it
    assert at_the_edge['diff'] == at_the_edge['std'] == 1.0 and at_the_edge['within_spread'] is False
    saturated = seed_stats([100.0, 100.0, 100.0])
    assert compare_to(saturated, saturated)['within_spread'] is True  # no difference at all, no spread
    with pytest.raises(ValueError):
        seed_stats([])


def test_summary_means_over_seeds_and_marks_the_spread(tmp_path):
    fl = _three_seeds(tmp_path)
    analyses = read_analyses([tmp_path / 's0', tmp_path / 's1', tmp_path / 's2'])
    assert len(analyses['cka']) == 3 and len(analyses['attention']) == 3
    summary = summarize(analyses)
    assert summary['reference'] == 'refiner'
    ref, vit = summary['models']['refiner']['measures'], summary['models']['vit']['measures']
    assert ref['cka_first_last']['mean'] == pytest.approx(0.65)
    assert ref['cka_first_last']['std'] == pytest.approx(statistics.stdev(fl['refiner']))
    assert vit['cka_first_last']['diff'] == pytest.approx(0.20) and vit['cka_first_last']['within_spread'] is False
    # normalised CKA at 25%: refiner 0, .1, .2; vit .2, .3, .4: +0.2, outside a spread of 0.1
    assert ref['normalised_cka_0.25']['values'] == pytest.approx([0.0, 0.1, 0.2])
    assert vit['normalised_cka_0.25']['diff'] == pytest.approx(0.2) and not vit['normalised_cka_0.25']['within_spread']
    assert vit['normalised_cka_0.50']['diff'] == pytest.approx(0.3) and not vit['normalised_cka_0.50']['within_spread']
    assert vit['normalised_cka_0.75']['within_spread'] is False
    # head similarity: the mean over blocks per file, then over files
    assert ref['head_similarity']['values'] == pytest.approx([0.2, 0.15, 0.1])
    assert ref['head_similarity_refined']['values'] == pytest.approx([0.0, -0.1, -0.2])
    assert ref['head_similarity_before']['mean'] == pytest.approx(0.4)
    assert ref['cross_block_similarity']['values'] == pytest.approx([0.0, 0.02, 0.04])
    assert 'head_similarity_refined' not in vit  # no refining block
    assert vit['head_similarity']['values'] == pytest.approx([0.15, 0.155, 0.16])
    refined = summary['models']['deit_refined']['measures']
    assert refined['head_similarity_refined']['values'] == pytest.approx([0.1] * 3)
    assert refined['head_similarity_before']['mean'] == pytest.approx(0.3)
    resnet = summary['models']['resnet18']
    assert resnet['measures']['cka_first_last']['n'] == 1 and resnet['measures']['cka_first_last']['std'] is None
    assert len(summary['models']['refiner']['cka_with_last']) == 3


def test_summary_command_writes_table_json_and_figure(tmp_path, capsys):
    _three_seeds(tmp_path)
    out = tmp_path / 'summary'
    assert main(['analyze', 'summary', str(tmp_path / 's0'), str(tmp_path / 's1' / 'cka' / 'cka.json'),
                 str(tmp_path / 's2'), '--reference', 'vit', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '3 CKA and 2 attention analyses of fashion_mnist' in printed
    table = (out / 'summary.md').read_text()
    assert '| refiner (3 CKA, 2 attention runs) | 0.65 ± 0.05 (-0.20) |' in table
    assert '| resnet18 (1 run) | 0.60 (-0.25, one seed) |' in table
    assert 'images per analysis: 1000 (CKA), 256 (attention)' in table
    saved = json.loads((out / 'summary.json').read_text())
    assert saved['reference'] == 'vit' and saved['table'] == table.strip()
    assert (out / 'cka_curves_normalised.png').stat().st_size > 10_000


def test_a_file_named_twice_counts_once(tmp_path):
    _three_seeds(tmp_path)
    again = tmp_path / 's0' / 'cka' / '..' / 'cka' / 'cka.json'
    analyses = read_analyses([tmp_path / 's0' / 'cka' / 'cka.json', again, tmp_path / 's0'])
    assert len(analyses['cka']) == 1 and len(analyses['attention']) == 1


def test_summary_of_real_analyses(tmp_path):
    """The files `refiner analyze cka` / `attention` write are what the summary reads."""
    common = ['--model', 'refiner_vit_nano', '--img-size', '16', '--model-args', TINY_REFINER,
              '--max-images', '16', '--batch-size', '8', '--no-progress']
    assert main(['analyze', 'cka', *common, '--out', str(tmp_path / 'a' / 'cka')]) == 0
    assert main(['analyze', 'attention', *common, '--out', str(tmp_path / 'a' / 'attention')]) == 0
    cka = json.loads((tmp_path / 'a' / 'cka' / 'cka.json').read_text())
    (entry,) = cka['models'].values()
    summary = summarize(read_analyses([tmp_path / 'a']))
    measures = summary['models']['refiner_vit_nano']['measures']
    assert measures['cka_first_last']['mean'] == pytest.approx(entry['cka_first_last'])
    assert measures['normalised_cka_0.50']['mean'] == pytest.approx(entry['normalised_at_depth']['0.50'])
    assert {'head_similarity', 'head_similarity_refined', 'head_similarity_before',
            'cross_block_similarity'} <= set(measures)


def test_summary_errors_say_what_was_expected(tmp_path, capsys):
    _three_seeds(tmp_path)
    with pytest.raises(SummaryError, match='does not exist'):
        read_analyses([tmp_path / 'missing'])
    with pytest.raises(SummaryError, match='holds no cka.json'):
        read_analyses([_write(tmp_path / 'empty' / 'x.txt', {}).parent])
    with pytest.raises(SummaryError, match='not a result of'):
        read_analyses([_write(tmp_path / 'other.json', {'models': {'a': {'top1': 1}}})])
    bad = tmp_path / 'bad.json'
    bad.write_text('{not json')
    with pytest.raises(SummaryError, match='not readable JSON'):
        read_analyses([bad])
    digits = _write(tmp_path / 'digits' / 'cka.json', _cka({'refiner': 0.5}, {'refiner': (0, 0, 0)}, data='digits'))
    with pytest.raises(SummaryError, match='different data'):
        read_analyses([tmp_path / 's0', digits])
    deeper = _write(tmp_path / 'deep' / 'cka.json', _cka({'refiner': 0.5}, {'refiner': (0, 0, 0)}, blocks=6))
    with pytest.raises(SummaryError, match='4 blocks in one analysis and 6'):
        summarize(read_analyses([tmp_path / 's0', deeper]))
    for key in ('normalised_at_depth', 'cka_with_last'):
        broken = _cka({'refiner': 0.5, 'vit': 0.6}, {'refiner': (0, 0, 0), 'vit': (0, 0, 0)})
        del broken['models']['vit'][key]  # the second model: the file's kind is read from the first
        with pytest.raises(SummaryError, match='the entry of vit is incomplete'):
            summarize(read_analyses([_write(tmp_path / key / 'cka.json', broken)]))
    with pytest.raises(SummaryError, match="reference model 'deit'"):
        summarize(read_analyses([tmp_path / 's0']), reference='deit')
    assert main(['analyze', 'summary', str(tmp_path / 'missing')]) != 0
    assert 'does not exist' in capsys.readouterr().err
