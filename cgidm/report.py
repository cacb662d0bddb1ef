"""``report.html``: what people look at — summary, ROC curve, score histograms per label,
and a sortable table of every image with its triptych (original | partial | recovered).

Paths from ``results.jsonl`` become links only when they are relative paths inside the
output folder: a results file can be edited or come from elsewhere, and a ``javascript:``
or remote URL in it must not become something a click runs or fetches.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import unquote

from jinja2 import Environment, select_autoescape

from cgidm import provenance
from cgidm.config import BASELINE_FIELDS, HIGHER_IS_BETTER, METRICS
from cgidm.files import atomic_write_text, fraction, shown  # noqa: F401 (fraction: re-exported)

# What each score column measures, in plain words: the ``title`` (tooltip) of its header.
# The column keeps its technical name, which results.jsonl and summary.json use.
METRIC_TITLES = {
    "latent_cos": "cosine similarity of the original and the recovered latent (the model's compressed form of the "
                  "image), on the hidden part only: at most 1 (the same direction); higher is a closer recovery",
    "latent_mse": "mean squared difference of the original and the recovered latent, on the hidden part only: "
                  "lower is a closer recovery",
    "ssim": "structural similarity (SSIM) of the original and the recovered picture: 1 is identical; higher is closer",
    "psnr": "peak signal-to-noise ratio (PSNR) of the recovered picture against the original, in decibels, "
            "at most 100: higher is closer",
    "embed_cos": "cosine similarity of the embeddings (CLIP or DINO, --embedder) of the original and its own "
                 "recovery: higher is closer",
    "official_cos": "the paper's validator: the highest cosine similarity of the original's embedding (CLIP or DINO) "
                    "with those of every recovered image of its folder: higher is closer",
}
# the baselines' columns keep their names; their rows in the comparison table get these
BASELINE_TITLES = {
    "loss_diff": "the pretrained model's denoising loss minus the fine-tuned model's, no recovery: higher = member",
    "ft_only": "the same recovery steered by the fine-tuned model alone, no contrast: higher = member",
    "pre_only": "the same recovery steered by the pretrained model alone: higher = member",
    "masked": "the partial picture alone, no recovery, scored the same way: higher = member",
    "pia": "PIA (Kong et al., ICLR 2024), a membership test on the fine-tuned model: lower = member",
    "secmi": "SecMI (Duan et al., ICML 2023), a membership test on the fine-tuned model: lower = member",
}

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>cgidm report</title>
<style>
code,td,li{unicode-bidi:isolate}
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{margin:0 0 4px} .sub{color:#666;margin-bottom:16px} .note{color:#666;font-size:smaller;max-width:24em}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:22px}
.plots img{max-width:420px;margin-right:12px;border:1px solid #eee}
table{border-collapse:collapse;margin-top:16px;width:100%}
table.compare{width:auto}
th,td{border-bottom:1px solid #eee;padding:6px 8px;text-align:left;vertical-align:middle}
th{cursor:pointer;background:#fafafa;position:sticky;top:0} th:hover{background:#eef}
td img{height:96px;image-rendering:pixelated}
.member{color:#b00}.holdout{color:#06a}.control{color:#666}.error{color:#b00;font-weight:bold}
.flag{background:#fee}
.verdict{border:2px solid #999;border-radius:8px;padding:10px 14px;margin:12px 0;max-width:60em}
.verdict.hit{border-color:#b00} .verdict .note{display:block;max-width:none;margin-top:4px}
.card .note{display:block}
abbr[title],th[title],span[title]{text-decoration:underline dotted} .card[title]{cursor:help}
.guide{max-width:75em;margin:8px 0 12px} .guide summary{cursor:pointer} .guide li{margin:3px 0}
</style></head><body>
<h1>cgidm report</h1>
<div class="sub">CGI-DM: {{ g.hidden }} of each image's latent was removed and recovered from the contrast
between the fine-tuned and the pretrained model. Images the model was fine-tuned on come back
closer to the original than images it never saw (a score: higher is closer, except <code>latent_mse</code>, where lower is).
Each row shows <i>original | partial | recovered</i>.</div>
<details class="guide"><summary><b>How to read this report</b>: in plain words, what was done to each image and
what the scores and verdicts mean</summary><ul>
<li><b>What was done.</b> Each image was turned into the model's compressed form (its <i>latent</i>) and {{ g.hidden }}
of it was hidden. A step-by-step search (<abbr title="projected gradient descent">PGD</abbr>) rebuilt the hidden part,
steered by the <i>contrast</i> between the suspect fine-tuned model and the original model it was made from.</li>
<li><b>Scores</b> say how close the recovered image came to the original (the score column is <code>{{ g.metric }}</code>;
hover over a column's name for what it measures). Higher is closer (for <code>latent_mse</code>, lower is), and images
the model was fine-tuned on tend to come back closer than images it never saw.</li>
<li><b>Controls</b>: images like these (same kind, style and size) known not to be in the fine-tune. How well they come
back shows what happens without training; a score alone says little.</li>
<li><b>p-value</b> of an image: the share of {{ g.controls }} that came back at least as well, counting the image
itself; small means few did{% if not g.judged %} (none here: no controls were given, so no p-value or verdict){% endif %}. <b>z</b>: how many standard deviations of the control scores it lies from their average, positive
when it came back better.</li>
<li><b>Verdict</b> of an image: <i>fine-tuned on</i> when its p-value is at most {{ g.level }}; <i>no evidence</i> above
that, which is not proof it was not used; <i>inconclusive</i> when too few controls allow so small a p-value. Each image
is tested on its own, so some images never trained on are flagged by chance.</li>
{% if g.judged %}<li><b>Set verdict</b> ({{ g.set_where }}): one test of all the suspect images together (members and
unlabelled images, not hold-outs) against {{ g.against }}; its p-value is the chance that they would rank at least this
far above the controls if none of them were in the fine-tune.</li>{% endif %}
<li><b>AUC</b>, when images labelled <i>member</i> (known to be in the fine-tune) and <i>hold-out</i> (known not to be)
were given: the chance that a member scores better than a hold-out; 1 means every member above every hold-out, 0.5 a
coin toss. It says how well the method tells them apart here; it is not a verdict.</li>
<li><b>failed</b>: an image that could not be scored (the reason is in its row). <b>Stalled</b>: every search step was
skipped (no usable gradient), so the score is of the starting point: verdict <i>failed</i>, no p-value, left out of
the AUC and the set verdict.</li>
</ul></details>
{% if sv %}<div class="verdict {{ 'hit' if sv.verdict == 'fine-tuned on some of these images' else '' }}"><b>Was the model fine-tuned on some of these images?</b>
{% if sv.error %}No set verdict: {{ sv.error }}{% else %}<b>{{ sv.verdict }}</b> at <abbr title="{{ g.level_title }}">level</abbr> {{ sv.level }}: p = {{ fmt(sv.p_value) }}
(<span title="a rank test of whether the suspect images' scores tend to be better than the controls'; U counts the
(suspect, control) pairs in which the suspect came back better, ties counting half, out of {{ sv.n_suspect }} &times; {{ sv.n_controls }} pairs">{{ sv.test }}, {{ sv.method }}</span>; U = {{ "%g"|format(sv.statistic) if sv.statistic is number else sv.statistic }}; {{ sv.n_suspect }} suspect vs {{ sv.n_controls }} control images{% if sv.holdouts_left_out %};
{{ sv.holdouts_left_out }} hold-out{{ 's' if sv.holdouts_left_out != 1 else '' }}, known not trained on, left out{% endif %}).
<span class="note">One test of the suspect images (members and unlabelled images) together against the controls: a small p
means they recover better than images known not to be in the fine-tune, more than chance explains.{% if sv.verdict == 'no evidence' %}
"No evidence" is not proof that the images were not used.{% endif %}</span>
{% if sv.warning %}<span class="error">{{ sv.warning }}</span>{% endif %}{% endif %}</div>{% endif %}
<div class="cards">
<div class="card" title="images given">images<b>{{ s.images }}</b></div>
<div class="card" title="images whose hidden part was rebuilt and scored">scored<b>{{ s.scored }}</b></div>
<div class="card" title="images that could not be scored; the reason is in each one's row">failed<b>{{ s.failed }}</b></div>
{% if s.auc is defined and s.auc is not none %}<div class="card" title="{{ g.auc_title }}">AUC ({{ s.metric }})<b>{{ fraction(s.auc) }}</b><span class="note">members vs hold-outs: 1 every member above every hold-out, 0.5 chance</span></div>
<div class="card" title="the share of members and hold-outs on the right side of the one score threshold that sorts them best">accuracy<b>{{ fraction(s.accuracy) }}</b><span class="note">at the best threshold, chosen on these same images</span></div>
<div class="card" title="{{ g.tpr_title }}">TPR @ 1% FPR<b>{{ fraction(s.tpr_at_1fpr) }}</b><span class="note">members found when at most 1 % of hold-outs are{% if s.by_metric and s.by_metric[s.metric] and s.by_metric[s.metric].n_holdouts < 100 %}; with {{ s.by_metric[s.metric].n_holdouts }} hold-outs (under 100) it is not measured well{% endif %}</span></div>{% endif %}
{% if s.official %}{% set standin = s.embedder and s.embedder.stand_in %}<div class="card" title="the paper's own scoring: each original against every recovered image of its folder (the highest cosine of their CLIP or DINO embeddings), members vs hold-outs on its grid of thresholds">official validator AUC ({{ (s.embedder.label or s.embedder.kind) if s.embedder else '' }}, max over the folder)<b>{{ fraction(s.official.auc) }}</b>{% if standin %}<span class="note error">a random network: this checks the code path and says nothing about the images</span>{% endif %}</div>
<div class="card">official accuracy{% if standin %} (random stand-in){% endif %}<b>{{ fraction(s.official.accuracy) }}</b></div>{% endif %}
{% if s.flagged is defined %}<div class="card" title="images whose own p-value is at most the level: each one tested on its own">flagged as fine-tuned on (p &le; {{ s.config.level if s.config else '' }})<b>{{ s.flagged }}{% if s.verdicts %} of {{ s.verdicts|length }}{% endif %}</b>{% if s.flagged_by_chance %}<span class="note">each image tested on its own: about {{ s.flagged_by_chance }} would be flagged by chance if none had been trained on</span>{% endif %}</div>{% endif %}
</div>
{% if s.calibration_error %}<p class="error">{{ s.calibration_error }}</p>{% endif %}
{% if s.controls_warning %}<p class="error">{{ s.controls_warning }}</p>{% endif %}
{% if s.calibration_warning %}<p class="error">{{ s.calibration_warning }}</p>{% endif %}
{% if s.copies_warning %}<p class="error">{{ s.copies_warning }}</p>{% endif %}
{% if s.auc_warning %}<p class="error">{{ s.auc_warning }}</p>{% endif %}
{% if s.set_verdict_warning %}<p class="error">{{ s.set_verdict_warning }}</p>{% endif %}
{% if s.sample_warning %}<p class="sub">{{ s.sample_warning }}</p>{% endif %}
{% for line in unjudged %}<p class="error">{{ line }}</p>{% endfor %}
{% if compare %}<table class="compare"><thead><tr><th>method</th><th title="{{ g.auc_title }}">AUC</th><th>accuracy</th><th title="{{ g.tpr_title }}">TPR @ 1% FPR</th></tr></thead>
<tbody>{% for name, m in compare %}<tr{% if baseline_titles[name] %} title="{{ baseline_titles[name] }}"{% endif %}><td>{{ name }}</td><td>{{ fraction(m.auc) }}</td><td>{{ fraction(m.accuracy) }}</td><td>{{ fraction(m.tpr_at_1fpr) }}</td></tr>{% endfor %}</tbody></table>
<p class="sub">Baselines on the same pair and images, members vs hold-outs (cgidm/baselines.py): other tests of
whether an image was in the fine-tune, run for comparison, each in its <code>baseline_&lt;name&gt;</code> column below.</p>{% endif %}
{% if s.pairs and s.pairs|length > 1 %}<table class="compare"><thead><tr><th>pair</th><th>images</th><th>failed</th>
<th title="{{ g.auc_title }}">AUC</th><th>flagged</th><th>set verdict</th></tr></thead><tbody>{% for k, p in s.pairs.items() %}<tr><td>{{ k|shown }}</td>
<td>{{ p.images }}</td><td>{{ p.failed }}</td><td>{{ fraction(p.auc) }}{% if p.sample_warning and p.auc is not none %} (few labelled images){% endif %}</td>
<td>{% if p.flagged is defined %}{{ p.flagged }}{% elif not p.controls and not p.calibration_error %}no controls: no verdicts{% endif %}</td>
<td>{% if p.set_verdict and p.set_verdict.p_value is not none %}{{ p.set_verdict.verdict }} (p = {{ fmt(p.set_verdict.p_value) }}){% endif %}</td></tr>{% endfor %}</tbody></table>
<p class="sub">Each pair on its own: the AUC of its members vs hold-outs, its images flagged against its own controls.
The figures above pool every pair.</p>{% endif %}
{% if s.config %}<p class="sub">{% if s.config.prompt is none and s.prompts %}prompts: {% for k, v in s.prompts.items() %}{{ k|shown }} <code>{{ v.prompt|shown }}</code> ({{ v.from|shown }}){% if not loop.last %}, {% endif %}{% endfor %}{% else %}prompt: <code>{{ s.config.prompt|shown }}</code>{% if s.prompt_from %} ({{ s.prompt_from|shown }}){% endif %}{% endif %};
<abbr title="projected gradient descent: the step-by-step search that rebuilds the hidden part">PGD</abbr> {{ s.config.pgd.steps }} steps,
<abbr title="how far (L2) each step moves the hidden part">step</abbr> {{ s.config.pgd.alpha }},
<abbr title="how far (L2) the rebuilt part may move in all from where the search started">radius</abbr> {{ s.config.pgd.eps }},
<abbr title="shared: both models see the same random noise and timestep at each step; paper: each draws its own, as the paper's code does">noise</abbr> {{ s.config.pgd.noise }},
engine {{ s.config.engine }}{% if s.runtime %}, on {{ s.runtime.device }} in {{ s.runtime.dtype }} (cgidm {{ s.runtime.cgidm }}, torch {{ s.runtime.torch }}){% if s.runtime.time %}, {{ s.runtime.time }}{% endif %}{% endif %}{% if s.preset %}; preset {{ s.preset.name }}{% for k, v in s.preset.departures.items() %}{% if loop.first %}, departures:{% endif %} {{ k }} {{ v.given }} (preset {{ v.preset }}){% endfor %}{% endif %}{% if s.departures_from_defaults %};
settings that differ from the defaults (the paper's):{% for k, v in s.departures_from_defaults.items() %} {{ k }} {{ v.given }} (default {{ v.preset }}){% endfor %}{% endif %}{% if s.config.seed is defined %}; seed {{ s.config.seed }}{% endif %}</p>{% endif %}
{% if models %}<p class="sub">models: {% for k, v in models %}{{ k|shown }} = <code>{{ v|shown }}</code>{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}
{% for w in lora_warnings %}<p class="error">{{ w|shown }}</p>{% endfor %}
<div class="plots">{% for p in plots %}<img alt="{{ p.alt }}" src="data:image/png;base64,{{ p.data }}">{% endfor %}</div>
{% if rows|length < all_rows %}<p class="sub">The table shows {{ rows|length }} of {{ all_rows }} images: the failed,
the flagged, then the best recovered. Every image's row is in <code>results.jsonl</code>.</p>{% endif %}
<table id="rows"><thead><tr>
<th data-k="s">image</th><th data-k="s" title="member: known to be in the fine-tune; holdout: known not to be; control: known not to be, the yardstick of the p-values; empty: unlabelled, to be tested">label</th>{% if pairs %}<th data-k="s">pair</th>{% endif %}<th data-k="n" title="{{ g.score_title }}">score</th>
{% for f in fields %}<th data-k="n"{% if f in metric_titles %} title="{{ metric_titles[f] }}"{% endif %}>{{ f }}{% if f == 'psnr' %} (dB){% endif %}</th>{% endfor %}
{% if zs %}<th data-k="n" title="how many control standard deviations above the controls' mean (oriented: positive is a better recovery)">z</th>{% endif %}<th data-k="n" title="the share of controls that came back at least as well as this image, counting the image itself: small means few did">p-value</th><th data-k="s" title="fine-tuned on: p-value at most the level; no evidence: above it (not proof the image was not used); inconclusive: too few controls for any image to reach the level; failed: nothing to judge (stalled: every search step skipped; or a score that is not a number)">verdict{% if s.config and s.config.level is defined and s.flagged is defined %} (p &le; {{ s.config.level }}){% endif %}</th><th title="the original; the partial picture, what was left once part of the latent was hidden; the recovered picture, with the hidden part rebuilt">original | partial | recovered</th></tr></thead>
<tbody>{% for r in rows %}
<tr class="{{ 'flag' if r.verdict == 'fine-tuned on' else '' }}">
<td>{{ r.id|shown }}{% if r.notes %}<div class="note">{{ r.notes|join('; ')|shown }}</div>{% endif %}{% if r.looks_like %}<div class="note">looks like {{ r.looks_like|shown }} (perceptual hashes {{ r.looks_bits }} of 64 bits apart): counted as given</div>{% endif %}{% if r.copy_of %}<div class="note">the same file or pixels (SHA-256) as {{ r.copy_of|shown }}: {{ {'left_out': 'left out of the calibration', 'counted_once': 'counted once', 'conflicts': 'the labels contradict each other', 'of_holdouts': ('an unlabelled image' if r.label == 'holdout' else 'a hold-out, known not trained on')}.get(r.copy_kind, 'one picture') }}</div>{% endif %}</td><td class="{{ r.label or '' }}">{{ (r.label or '')|shown }}</td>{% if pairs %}<td>{{ (r.pair or '')|shown }}</td>{% endif %}
{% if r.error %}<td class="error" colspan="{{ fields|length + (4 if zs else 3) }}">failed: {{ r.error|shown }}</td><td></td>
{% else %}<td>{{ fmt(r.score) }}</td>{% for f in fields %}<td>{{ fmt(r[f]) }}</td>{% endfor %}
{% if zs %}<td>{{ "%+.2f"|format(r.z) if r.z is number else '' }}</td>{% endif %}<td>{{ fmt(r.p_value) }}</td><td>{{ r.verdict or '' }}{% set card = r.evidence|local_link %}{% if card %} <a href="{{ card }}" title="the triptych with its verdict, score, models and settings written under it: one picture to pass on">(evidence card)</a>{% endif %}</td>
<td>{% set link = r.triptych|local_link %}{% if link %}<a href="{{ link }}"><img loading="lazy" alt="triptych of {{ r.id|shown }}" src="{{ link }}"></a>{% elif r.triptych %}<code>{{ r.triptych|shown }}</code>{% endif %}</td>{% endif %}
</tr>{% endfor %}</tbody></table>
{{ files_table }}
<script>
document.querySelectorAll('#rows th[data-k]').forEach((th, col) => {
  let asc = false;
  th.addEventListener('click', () => {
    asc = !asc;
    const body = document.querySelector('#rows tbody');
    const num = th.dataset.k === 'n';
    const key = tr => { const t = tr.children[col] ? tr.children[col].textContent.trim() : '';
                        const v = parseFloat(t);  // an error row's "failed: ..." cell is not a number
                        return num ? (isNaN(v) ? null : v) : t; };
    // each row's key read once, not at every comparison; the rows moved in one fragment;
    // an empty cell (a control's p-value, a failed row's score) last either way
    const keyed = [...body.rows].map(r => [key(r), r]);
    keyed.sort((a, b) => a[0] === null || b[0] === null ? (a[0] === null) - (b[0] === null)
                         : (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0) * (asc ? 1 : -1));
    const frag = document.createDocumentFragment();
    keyed.forEach(([, r]) => frag.appendChild(r));
    body.appendChild(frag);
  });
});
</script>
</body></html>
"""


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        # a small value (a p-value) keeps three digits: 0.000549, not 0.0005 (nor 0.0000,
        # which would read as impossible)
        return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.4f}"
    return str(v)


def local_link(value) -> Optional[str]:
    """``value`` if it is a relative path that stays inside the output folder (no scheme,
    no leading ``/`` or ``\\``, no ``..`` part, also once percent-decoded, since browsers
    decode ``%2e%2e`` to ``..``), else None: then the report shows it as text."""
    if not isinstance(value, str) or not value.strip():
        return None
    for text in (value, unquote(value)):
        if (
            ":" in text or "\\" in text  # a ":" starts a scheme or names a drive
            or text.startswith("/") or text.strip() != text
            or any(part == ".." for part in text.split("/"))
            or not text.isprintable()
        ):
            return None
    return value


def _lora_text(match) -> Optional[str]:
    if isinstance(match, dict) and isinstance(match.get("matched"), int) and isinstance(match.get("total"), int):
        return f"{match['matched']} of {match['total']} layers applied"
    return None


def _models(models) -> tuple[list[tuple[str, str]], list[str]]:
    """The models line of the report as ``(name, text)`` pairs, and a warning for each
    LoRA that was applied only in part (the run allowed it; the reader must know)."""
    if not isinstance(models, dict):
        return [], []
    lines, warnings = [], []
    for k, v in models.items():
        if k == "lora_match" and _lora_text(v):
            lines.append(("LoRA", _lora_text(v)))
            if v["matched"] < v["total"]:
                warnings.append(
                    f"Only {v['matched']} of {v['total']} LoRA layers fit the base model: "
                    "the suspect model was applied in part, and the results may understate it."
                )
        elif isinstance(v, dict):  # a record of its own (the memory plan): its summary line, or its fields
            text = v.get("summary")
            lines.append((k, text if isinstance(text, str) else ", ".join(f"{a}={b}" for a, b in v.items())))
        else:
            lines.append((k, v))
    return lines, warnings


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _bins(lo: float, hi: float, summary: dict, n: int = 20):
    """Histogram bin edges over [lo, hi]: ``n`` bins, shifted so that one edge falls on the
    flag line, on the side that keeps a score at the line (not flagged) out of the flagged
    side's bin: just above it where higher is better, on it where lower is."""
    import numpy as np

    if not hi > lo:
        return np.array([lo - 0.5, hi + 0.5])
    width, at = (hi - lo) / n, summary.get("flag_line")
    if not isinstance(at, (int, float)) or not lo <= at <= hi:
        return np.linspace(lo, hi + max(1e-12, abs(hi) * 1e-9), n + 1)
    if HIGHER_IS_BETTER.get(summary.get("metric"), True):
        at += max(1e-12, abs(at) * 1e-9)  # a bin is [a, b): the line's own score stays left
    start = at - math.ceil((at - lo) / width) * width
    return start + width * np.arange(int(math.ceil((hi - start) / width)) + 2)


def flag_line_text(summary: dict) -> Optional[str]:
    """What the histogram's dashed line means: "flagged above 0.603 (p <= 0.05)"; None
    without per-image verdicts (no controls, or too few to reach the level)."""
    at = summary.get("flag_line")
    if not isinstance(at, (int, float)) or not math.isfinite(at):
        return None
    side = "above" if HIGHER_IS_BETTER.get(summary.get("metric"), True) else "below"
    level = (summary.get("config") or {}).get("level")
    return f"flagged {side} {at:.6g}" + (f" (p <= {level})" if level is not None else "")


def _plots(rows: Sequence[dict], summary: dict) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots = []
    good = [r for r in rows if "error" not in r]
    if good:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        groups: dict[str, list[float]] = {}
        off: dict[str, int] = {}  # a score that is not a finite number (nan, inf) has no bin
        copies = sum(r.get("label") == "control" and "copy_of" in r for r in good)
        for r in good:
            label = r.get("label") or "unlabelled"
            if label == "control" and "copy_of" in r:
                continue  # left out of the calibration (copies.py): not drawn among the controls
            score = r.get("score")
            if isinstance(score, (int, float)) and math.isfinite(score):
                groups.setdefault(label, []).append(float(score))
            else:
                off[label] = off.get(label, 0) + 1
        colors = {"member": "#c33", "holdout": "#27c", "control": "#888", "unlabelled": "#5a5"}
        if groups:
            lo = min(min(v) for v in groups.values())
            hi = max(max(v) for v in groups.values())
            bins = _bins(lo, hi, summary)
            for label, vals in sorted(groups.items()):
                left = f"; {copies} copies left out" if label == "control" and copies else ""
                ax.hist(vals, bins=bins, alpha=0.55, label=f"{label} ({len(vals)}{left})", color=colors.get(label))
            line = flag_line_text(summary)
            if line:  # where the per-image verdict starts: beyond it, flagged
                ax.axvline(summary["flag_line"], color="#000", ls="--", lw=1.2, label=line)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # images are counted whole
        ax.set_xlabel(f"score ({summary.get('metric')})")
        ax.set_ylabel("images")
        gone = ", ".join(f"{n} {label}" for label, n in sorted(off.items()))
        ax.set_title("scores by label" + (f"\nnot a number, not drawn: {gone}" if gone else ""),
                     fontsize=None if not gone else 9)
        line = flag_line_text(summary) if groups else None
        plots.append({"alt": "score histogram" + (f"; dashed line: {line}" if line else "") +
                      (f" ({gone} not a number, not drawn)" if gone else ""),
                      "data": _png(fig)})
        plt.close(fig)
    roc = summary.get("roc")
    if roc:
        fig, ax = plt.subplots(figsize=(3.4, 3.2))
        ax.plot(roc["fpr"], roc["tpr"], color="#c33", lw=2, label=f"AUC {fraction(summary['auc'])}")
        ax.plot([0, 1], [0, 1], color="#aaa", ls="--", lw=1)
        ax.set_xlabel("false positive rate (hold-outs)")
        ax.set_ylabel("true positive rate (members)")
        ax.set_title("ROC")
        ax.legend(loc="lower right", fontsize=8)
        plots.append({"alt": "ROC curve", "data": _png(fig)})
        plt.close(fig)
    return plots


def _guide(summary: dict) -> dict:
    """What the plain-language parts of the report say that depends on the run: how much
    of the latent was hidden (half with the default mask), the level, the score's name and
    which way is closer."""
    cfg = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    metric = summary.get("metric")
    level = cfg.get("level")
    level = "the level" if level is None else level
    # blocks of 4x4 cells (no blocks_per_side given) with two 2x2 corners kept: half the latent
    default_mask = cfg.get("blocks_per_side") is None and cfg.get("pass_rate") == 2
    higher = HIGHER_IS_BETTER.get(metric, True)
    closer = "higher is closer" if higher else "lower is closer"
    pairs = summary.get("pairs") if isinstance(summary.get("pairs"), dict) else {}
    several = len(pairs) > 1  # a screen of several pairs: each judged against its own controls
    return {
        "hidden": "half" if default_mask else "part", "metric": metric, "level": level,
        "judged": bool(summary.get("controls")) or any(isinstance(p, dict) and p.get("controls")
                                                       for p in pairs.values()),
        "controls": "the controls of its pair" if several else "controls",
        "against": "the controls of its pair" if several else "the controls",
        "set_where": "per pair, in the table of pairs" if several else "the box at the top",
        "level_title": "the p-value at or below which the verdict is 'fine-tuned on'",
        "score_title": f"the score the AUC and the verdicts use: {metric}, repeated ({closer})",
        "auc_title": "area under the ROC curve: the chance that a member (known to be in the fine-tune) scores "
                     "better than a hold-out (known not to be), ties counting half; 1 every member above every "
                     "hold-out, 0.5 chance",
        "tpr_title": "true positive rate at 1 % false positive rate: the share of members above a score threshold "
                     "that at most 1 % of hold-outs pass",
    }


REPORT_ROWS = 2000  # table rows a browser still opens at once (10k took 19 s to load, 100k never)


TABLE_ORDER = {None: 0, "member": 1, "holdout": 2, "control": 3}


def shown_rows(rows: Sequence[dict], metric: Optional[str], limit: Optional[int] = None) -> list[dict]:
    """The rows the report's table shows, by label (``TABLE_ORDER``) then id: all of them up to ``limit``;
    past it, the failed, then the flagged (by p-value), then the best recovered (by score,
    oriented by ``metric``), ``limit`` in all. Every row stays in the results file."""
    limit = REPORT_ROWS if limit is None else limit
    if len(rows) > limit:
        sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0

        def rank(r: dict) -> tuple:
            score = r.get("score")
            good = isinstance(score, (int, float)) and math.isfinite(score)
            flagged = r.get("verdict") == "fine-tuned on"
            return ("error" not in r, not flagged, r.get("p_value") or 0.0 if flagged else 0.0,
                    -sign * score if good else math.inf)

        rows = sorted(rows, key=rank)[:limit]
    # the images tested first (unlabelled, members), then hold-outs, then the controls
    return sorted(rows, key=lambda r: (TABLE_ORDER.get(r.get("label"), len(TABLE_ORDER)), str(r.get("label")),
                                       r.get("id", "")))


def write_report(out: str | Path, rows: Sequence[dict], summary: dict) -> Path:
    """Render ``out/report.html`` (atomically); triptych paths are relative to ``out``."""
    from cgidm.summary import unjudged

    out = Path(out)
    fields = [f for f in METRICS + BASELINE_FIELDS
              if any(f in r for r in rows)]
    by_metric = summary.get("by_metric") or {}
    compare = []
    if any(f in by_metric for f in BASELINE_FIELDS) and summary.get("metric") in by_metric:
        compare = [(f"CGI-DM ({summary['metric']})", by_metric[summary["metric"]])]
        compare += [(f[len("baseline_"):], by_metric[f]) for f in BASELINE_FIELDS if f in by_metric]
    sv = summary.get("set_verdict")
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["local_link"] = local_link
    env.filters["shown"] = shown  # ids and names are untrusted: bidi overrides and controls as escapes
    models, lora_warnings = _models(summary.get("models"))
    stalled = summary.get("stalled")
    if isinstance(stalled, dict) and stalled.get("images"):
        lora_warnings.append(f"{stalled['images']} images: {stalled.get('note', '')}")
    html = env.from_string(TEMPLATE).render(
        models=models, lora_warnings=lora_warnings, files_table=provenance.table(summary),
        s=summary, rows=shown_rows(rows, summary.get("metric")), all_rows=len(rows),
        fields=fields, plots=_plots(rows, summary), fmt=_fmt, fraction=fraction, compare=compare,
        zs=any(isinstance(r.get("z"), (int, float)) for r in rows), unjudged=unjudged(summary),
        sv=sv if isinstance(sv, dict) else None,
        pairs=any(r.get("pair") for r in rows), g=_guide(summary), metric_titles=METRIC_TITLES,
        baseline_titles=BASELINE_TITLES,
    )
    path = out / "report.html"
    atomic_write_text(path, html)
    return path
