"""Pictures of a run: training curves of a run folder and the spike raster of one sample.

matplotlib is an optional extra (``pip install 'refimpl[plot]'``): this module imports without
it, and every function that draws imports it when called (:func:`require_matplotlib` raises
:class:`MatplotlibMissing`, an ``ImportError`` with the one-line install hint, when it is
absent). Figures are ``matplotlib.figure.Figure`` objects, never pyplot: no global figure
registry, no GUI backend. :func:`save_figure` writes ``.png`` or ``.svg`` atomically
(:mod:`refimpl.atomic`) and deterministically: the same data gives the same bytes (no
creation date in either format, a fixed ``svg.hashsalt`` for the SVG element ids).

- :func:`training_figure` (:func:`read_run` reads a run folder): loss, accuracy (classifier) or
  bits per token against the unigram and bigram baselines (language model), firing rate per
  layer and the energy estimate per sample or per token, one panel each, per epoch.
- :func:`raster_figure` (:func:`record_sample` runs the eval-mode forward of one sample with
  ``record=True``): per layer, the spikes of every channel over time (``binary_gsu``: the
  GSU's ternary ``Ter(v)``, +1 and -1 in two colours), and below it the membrane of at most
  four channels (:func:`trace_channels`) against the threshold, spike times marked. Nothing is
  recomputed: the spikes and membranes are the forward's own
  (:data:`refimpl.model.RECORD_NAMES`), the threshold is the family's
  (:meth:`refimpl.activations.Activation.membranes`), and every family-specific label is the
  family's :class:`~refimpl.activations.PlotText`.

Units of the membrane (DESIGN.md sections 4 and 8): ``lif``, ``refractory`` and ``sdn`` scale
their input by the learned threshold, ``v = y / exp(ln_vth)``, and fire at ``theta = 1``, so
their membrane is drawn in threshold units (1 = the channel's learned threshold); ``binary``
compares the S4D output itself with ``theta = 0``; ``binary_gsu`` ternarises ``v = y`` at
``0.15 max |v|`` over the channels of each time step.
"""
import json
import os

import numpy as np

from . import model as M
from .activations import ACTIVATIONS, PlotText
from .atomic import atomic_path, check_destination

#: Output formats by file extension.
FORMATS = {".png": "png", ".svg": "svg"}

INSTALL_HINT = "pip install 'refimpl[plot]'"

#: Most membrane traces drawn per layer.
MAX_TRACES = 4


#: The families whose record holds spikes (``s``) or the GSU's ternary activations (``Tx``):
#: those with :attr:`~refimpl.activations.Activation.events`.
RASTER_FAMILIES = tuple(k for k, fam in ACTIVATIONS.items() if fam.events is not None)

# Every figure is drawn and saved under these settings (matplotlib.rc_context: restored after).
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
          "figure.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3,
          "svg.hashsalt": "refimpl", "svg.fonttype": "path"}

# Data-free metadata: no creation time (PNG "Creation Time" is not written by default; SVG
# "Date" is), so the same data gives the same file.
_METADATA = {"png": {"Creation Time": None}, "svg": {"Date": None}}


class MatplotlibMissing(ImportError):
    """matplotlib (the optional ``plot`` extra) is not installed; the message says how to
    install it, on one line."""


def require_matplotlib():
    """Import matplotlib (the module), or raise :class:`MatplotlibMissing`."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401  (the Figure class every plot is built on)
    except ImportError:
        raise MatplotlibMissing(f"plotting needs matplotlib, an optional extra: "
                                f"{INSTALL_HINT}") from None
    return matplotlib


def figure_format(path):
    """The format of an output file from its extension (``"png"`` or ``"svg"``); ValueError
    naming the valid ones otherwise."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        valid = " or ".join(FORMATS)
        raise ValueError(f"cannot write {path}: the file name must end in {valid} (got "
                         f"{ext or 'no extension'})")
    return FORMATS[ext]


def check_output(path):
    """Refuse an output path before any work: a bad extension (:func:`figure_format`), a
    folder, or a place where no file can be created. An existing file is replaced. Returns
    the absolute path."""
    figure_format(path)
    return check_destination(path, overwrite=True)


def _figure(**kwargs):
    """A new ``matplotlib.figure.Figure`` (constrained layout), without pyplot."""
    require_matplotlib()
    from matplotlib.figure import Figure
    return Figure(layout="constrained", **kwargs)


def save_figure(fig, path):
    """Write ``fig`` to ``path`` (``.png`` or ``.svg``) atomically and deterministically.

    Returns the absolute path. The folder is created if needed; an existing file is replaced
    in one rename, and a failed write leaves nothing behind.
    """
    matplotlib = require_matplotlib()
    fmt = figure_format(path)
    path = check_output(path)
    with matplotlib.rc_context(_STYLE), atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, metadata=_METADATA[fmt])
    return path


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------

#: The keys every epoch of a run's ``metrics.json`` holds, by kind of run
#: (:func:`refimpl.train._epoch_metrics`, :func:`refimpl.lm_train._epoch_metrics`).
METRIC_KEYS = {
    "classifier": ("epoch", "loss", "test_loss", "train_accuracy", "test_accuracy",
                   "firing_rate", "energy_pj", "energy_ann_pj"),
    "lm": ("epoch", "loss", "val_loss", "unit", "train_bits_per_token", "val_bits_per_token",
           "unigram_bits_per_token", "bigram_bits_per_token", "firing_rate",
           "energy_per_token_pj", "energy_ann_per_token_pj"),
}


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_COUNT = ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
_NONNEGATIVE = ("a finite number >= 0", lambda v: _number(v) and 0 <= v < float("inf"))
_FRACTION = ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
_TEXT = ("a non-empty string", lambda v: isinstance(v, str) and v != "")

#: What each metric may hold, ``key -> (what, test)``; ``firing_rate`` is a list of one entry
#: per layer, each :data:`RATE`. Losses, bits and energies are finite and >= 0, accuracies and
#: firing rates fractions: refimpl writes nothing else (a diverged epoch is never written), so
#: a file with a string, a NaN or a negative rate was edited or damaged, and is refused rather
#: than drawn.
METRIC_VALUES = {
    "epoch": _COUNT, "unit": _TEXT,
    **dict.fromkeys(("loss", "test_loss", "val_loss", "train_bits_per_token",
                     "val_bits_per_token", "unigram_bits_per_token", "bigram_bits_per_token",
                     "energy_pj", "energy_ann_pj", "energy_per_token_pj",
                     "energy_ann_per_token_pj"), _NONNEGATIVE),
    **dict.fromkeys(("train_accuracy", "test_accuracy"), _FRACTION),
}

#: A layer's firing rate: spikes per neuron per step, or null (JSON) for a layer without spikes.
RATE = ("a number in [0, 1], or null for a layer without spikes",
        lambda v: v is None or _FRACTION[1](v))


def _check_values(metrics, kind, where):
    """ValueError (one line) at the first value :data:`METRIC_VALUES` refuses, or at epochs
    that do not increase or firing rates whose number of layers changes."""
    def bad(i, key, what, value):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{where}: epoch entry {i}: {key} must be {what}, got {shown}; "
                         f"refimpl writes no such value (the file was edited or damaged)")

    layers = metrics[0]["firing_rate"]
    layers = len(layers) if isinstance(layers, list) else 0
    for i, m in enumerate(metrics):
        for key in METRIC_KEYS[kind]:
            if key in METRIC_VALUES and not METRIC_VALUES[key][1](m[key]):
                bad(i, key, METRIC_VALUES[key][0], m[key])
        if i and m["epoch"] <= metrics[i - 1]["epoch"]:
            bad(i, "epoch", f"greater than the previous entry's ({metrics[i - 1]['epoch']})",
                m["epoch"])
        rates = m["firing_rate"]
        if not isinstance(rates, list) or not rates or len(rates) != layers:
            bad(i, "firing_rate", f"a list of one rate per layer ({layers or '>= 1'})", rates)
        for j, r in enumerate(rates):
            if not RATE[1](r):
                bad(i, f"firing_rate[{j}]", RATE[0], r)


def read_run(run_dir):
    """The metrics of a run folder (``metrics.json``, a list of per-epoch dicts) and its
    ``config.json`` (``{"model": ..., "train": ..., "data": ...}``, or None if absent).

    Raises FileNotFoundError / ValueError with one line naming the file and the fix.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a folder; give a run folder written by "
                                f"'refimpl train --out FOLDER'")
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a training run; give the "
                                f"folder 'refimpl train --out FOLDER' wrote")
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    metrics_kind(metrics, path)
    config = None
    cpath = os.path.join(run_dir, "config.json")
    if os.path.isfile(cpath):
        try:
            with open(cpath, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = None  # only titles and labels come from it
    return metrics, config if isinstance(config, dict) else None


def metrics_kind(metrics, where="metrics"):
    """``"classifier"`` or ``"lm"``: which training loop wrote ``metrics`` (a non-empty list of
    per-epoch dicts with :data:`METRIC_KEYS`, values as :data:`METRIC_VALUES` allows);
    ValueError naming the first missing key or impossible value."""
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, dict)
                                                               for m in metrics):
        got = f"{len(metrics)} entries" if isinstance(metrics, list) else type(metrics).__name__
        raise ValueError(f"{where} must be a non-empty list of per-epoch dicts (as "
                         f"'refimpl train' writes it), got {got}")
    kind = "lm" if "val_bits_per_token" in metrics[0] else "classifier"
    for m in metrics:
        missing = [k for k in METRIC_KEYS[kind] if k not in m]
        if missing:
            raise ValueError(f"{where}: epoch entry {m.get('epoch', '?')} lacks {missing[0]!r}; "
                             f"not a {kind} run's metrics.json as refimpl writes it")
    _check_values(metrics, kind, where)
    return kind


def _epochs(metrics):
    return np.array([m["epoch"] + 1 for m in metrics])  # (E,) 1-based, as the CLI prints


def _series(metrics, key):
    return np.array([np.nan if m[key] is None else m[key] for m in metrics], dtype=float)


def _rate_label(activation):
    """The firing-rate axis of a run of ``activation`` (a name from its config.json: the
    spikes' label for a name refimpl does not know)."""
    fam = ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    return (PlotText() if fam is None else fam.plot).rate


def training_figure(metrics, config=None, title=None, name=None):
    """Training curves of a run, one panel per quantity; returns a ``Figure``.

    Parameters
    ----------
    metrics : list of dict
        The run's ``metrics.json`` (classifier or language model, :func:`metrics_kind`).
    config : dict or None
        The run's ``config.json`` (the activation family names the firing-rate unit and the
        title; ``n_classes`` draws the chance level of a classifier).
    title : str or None
        Figure title (default: ``name``, the kind of run and its activation family).
    name : str or None
        The run's name for the default title (e.g. its folder's name).

    Notes
    -----
    Panels: loss per epoch (train, test or validation; nats), accuracy (classifier, with the
    chance level ``1 / n_classes``) or bits per byte/char (language model, with the unigram
    and bigram baselines of the validation targets as labelled horizontal lines), firing rate
    per layer ("no spikes" for layers without: GELU), energy estimate (SpikingSSM, DESIGN.md
    section 8) per sample or per token beside the ANN baseline (every mixing layer in MACs;
    log scale).
    """
    matplotlib = require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    kind = metrics_kind(metrics)
    model = (config or {}).get("model") or {}
    activation = model.get("activation")
    ep = _epochs(metrics)  # (E,)
    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(10, 7), dpi=100)
        axes = fig.subplots(2, 2).ravel()
        what = "classifier" if kind == "classifier" else "language model"
        default = (f"Training of {name + ': ' if name else ''}"
                   f"{activation + ' ' if activation else ''}{what}, {len(metrics)} epochs")
        fig.suptitle(title or default)
        line = {"marker": "o", "markersize": 3}
        ax = axes[0]
        if kind == "classifier":
            ax.plot(ep, _series(metrics, "loss"), label="train", **line)
            ax.plot(ep, _series(metrics, "test_loss"), label="test", **line)
            ax.set_ylabel("cross-entropy (nats per sample)")
        else:
            unit = metrics[-1]["unit"]
            ax.plot(ep, _series(metrics, "loss"), label="train", **line)
            ax.plot(ep, _series(metrics, "val_loss"), label="validation", **line)
            ax.set_ylabel(f"cross-entropy (nats per {unit})")
        ax.set_title("Loss")
        ax = axes[1]
        if kind == "classifier":
            ax.plot(ep, _series(metrics, "train_accuracy"), label="train", **line)
            ax.plot(ep, _series(metrics, "test_accuracy"), label="test", **line)
            n_classes = model.get("n_classes")
            if isinstance(n_classes, int) and n_classes >= 2:
                ax.axhline(1.0 / n_classes, color="0.4", linestyle=":", linewidth=1,
                           label=f"chance (1/{n_classes})", gid="chance")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("accuracy (fraction correct)")
            ax.set_title("Accuracy")
        else:
            ax.plot(ep, _series(metrics, "train_bits_per_token"), label="train", **line)
            ax.plot(ep, _series(metrics, "val_bits_per_token"), label="validation", **line)
            for key, style, name in (("unigram_bits_per_token", "--", "unigram"),
                                     ("bigram_bits_per_token", ":", "bigram")):
                b = metrics[-1][key]
                ax.axhline(b, color="0.35", linestyle=style, linewidth=1.2, gid=name,
                           label=f"{name} baseline ({b:.2f})")
            ax.set_ylabel(f"bits per {unit}")
            ax.set_title(f"Bits per {unit} (lower is better)")
        ax = axes[2]
        rates = [_series([{"r": m["firing_rate"][i]} for m in metrics], "r")
                 for i in range(len(metrics[0]["firing_rate"]))]  # per layer (E,)
        spiking = [(i, r) for i, r in enumerate(rates) if not np.all(np.isnan(r))]
        for i, r in spiking:
            ax.plot(ep, r, label=f"layer {i}", **line)
        if not spiking:
            ax.text(0.5, 0.5, f"no spikes\n({activation or 'non-spiking'} layers)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=12,
                    color="0.3", gid="no-spikes")
            ax.set_yticks([])
            ax.set_xlim(ep[0] - 0.5, ep[-1] + 0.5)
        ax.set_ylabel(_rate_label(activation))
        ax.set_title("Firing rate per layer (test set)" if kind == "classifier" else
                     "Firing rate per layer (validation)")
        ax = axes[3]
        if kind == "classifier":
            ax.plot(ep, _series(metrics, "energy_pj"), label="this model", **line)
            ax.plot(ep, _series(metrics, "energy_ann_pj"), label="ANN baseline (all MAC)",
                    linestyle="--")
            ax.set_ylabel("energy per sample (pJ)")
            ax.set_title("Energy estimate per sample (mixing layers)")
        else:
            ax.plot(ep, _series(metrics, "energy_per_token_pj"), label="this model", **line)
            ax.plot(ep, _series(metrics, "energy_ann_per_token_pj"),
                    label="ANN baseline (all MAC)", linestyle="--")
            ax.set_ylabel(f"energy per {unit} (pJ)")
            ax.set_title(f"Energy estimate per {unit} (mixing layers)")
        ax.set_yscale("log")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.get_legend_handles_labels()[0]:
                # accuracy rises to 1: its legend goes below the curves
                low = kind == "classifier" and ax is axes[1]
                ax.legend(loc="lower right" if low else "best")
    return fig


def plot_training(run_dir, out=None, title=None):
    """Draw the training curves of ``run_dir`` into ``out`` (default
    ``run_dir/training.png``); returns ``(path written, metrics, config)``."""
    out = os.path.join(run_dir, "training.png") if out is None else out
    check_output(out)
    metrics, config = read_run(run_dir)
    name = os.path.basename(os.path.abspath(run_dir))
    save_figure(training_figure(metrics, config, title, name), out)
    return os.path.abspath(out), metrics, config


# --------------------------------------------------------------------------------------------
# Spike raster of one sample
# --------------------------------------------------------------------------------------------


def check_raster_family(cfg):
    """ValueError (one line) unless ``cfg``'s family has spikes to draw."""
    if cfg.activation not in RASTER_FAMILIES:
        raise ValueError(f"a spike raster needs a spiking family, but this model's activation "
                         f"is {cfg.activation} (no spikes); use a checkpoint trained with "
                         f"--activation {' / '.join(RASTER_FAMILIES)}")


def check_layer(cfg, layer):
    """ValueError (one line) unless ``layer`` is None (every layer) or a layer index."""
    if layer is not None and not (isinstance(layer, (int, np.integer)) and
                                  0 <= layer < cfg.n_layers):
        raise ValueError(f"layer {layer} is out of range: the model has {cfg.n_layers} "
                         f"layer{'s' if cfg.n_layers > 1 else ''} (0..{cfg.n_layers - 1})")


def record_sample(cfg, params, buffers, x):
    """The eval-mode forward of one sample with ``record=True``.

    ``x``: one sample without the batch axis, ``(L, d_input)`` / ``(L,)`` floats or ``(L,)``
    int64 tokens. Returns ``(record, rates, logits)``: per layer a dict of ``(H, L)`` arrays
    (:data:`refimpl.model.RECORD_NAMES`), per layer the firing rate of this sample (None
    without spikes), and the logits ``(n_classes,)`` or ``(L, V)``.
    """
    x1 = M.model_inputs(cfg, np.asarray(x)[None])
    logits, _, _, stats = M.model_fwd(cfg, params, buffers, x1, training=False, record=True)
    record = [{k: a[0] for k, a in layer.items()} for layer in stats["record"]]
    return record, stats["rates"], logits[0]


def trace_channels(events, membrane, k=MAX_TRACES):
    """The channels whose membranes are drawn: the ``k`` most active (``events (H, L)``,
    nonzero = a spike), ties broken by the higher peak of ``membrane (H, L)``, then by the
    lower index; deterministic. Returns an int array ``(min(k, H),)``."""
    count = np.count_nonzero(events, axis=1)  # (H,)
    peak = np.max(membrane, axis=1)  # (H,)
    order = np.lexsort((np.arange(len(count)), -peak, -count))  # last key is the primary one
    return order[:k]


def _membrane(cfg, rec):
    """What the layer's spike test reads (the family's ``PlotText.trace``: the GSU's signed
    ``v``), its axis label and the threshold the family derives (:meth:`~refimpl.activations.
    Activation.membranes`): a number, or ``(1, L)`` per time step for ternary events."""
    fam = cfg.family
    ((_, theta),) = fam.membranes(rec).values()
    return rec[fam.plot.trace], fam.plot.membrane, theta


def _raster_marker_size(ax_height_in, H):
    """Marker area (points^2) of a ``|`` marker filling about 80 % of a channel's row."""
    row = 0.8 * ax_height_in * 72.0 / H  # points per channel row (80 %: the axes' share)
    return float(min(0.9 * row, 8.0) ** 2)


def raster_figure(cfg, record, layer=None, title=None, rates=None):
    """Spike raster and membrane traces of one sample; returns a ``Figure``.

    Parameters
    ----------
    cfg : ModelConfig
        A spiking family (:func:`check_raster_family`).
    record : list of dict
        Per layer the ``(H, L)`` arrays of one sample (:func:`record_sample`).
    layer : int or None
        Draw only this layer (default: every layer).
    title : str or None
        Figure title.
    rates : list or None
        Per layer firing rate to print in the panel titles (default: the mean of the spikes).

    Notes
    -----
    Each layer gets two panels sharing the time axis. Top: every channel's spikes (a ``|``
    marker at each ``(t, channel)`` where the recorded ``s`` is 1; ``binary_gsu``: the recorded
    ``Tx`` at +1 and -1 in two colours). Below: the membrane the spike test reads (``h``, or
    ``m + x`` for sdn, or the GSU's input ``v``) of at most :data:`MAX_TRACES` channels
    (:func:`trace_channels`), the spike times marked on each trace, and the threshold
    (:func:`refimpl.model.spike_threshold`; the GSU's ``+-0.15 max |v|`` over channels per
    step) drawn and labelled. Artists carry ``gid``\\ s for tests: ``raster.<layer>`` (or
    ``raster.<layer>.+1`` / ``.-1``), ``threshold.<layer>``, ``membrane.<layer>.<channel>``.
    """
    matplotlib = require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    check_raster_family(cfg)
    check_layer(cfg, layer)
    if len(record) != cfg.n_layers:
        raise ValueError(f"record must hold one dict per layer ({cfg.n_layers}), got "
                         f"{len(record)}")
    layers = range(cfg.n_layers) if layer is None else [int(layer)]
    fam = cfg.family
    text, ternary = fam.plot, fam.ternary  # -1/0/1 events (GSU): two colours, |v| traced
    raster_h, trace_h = 2.3, 1.8  # inches per layer
    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(9.5, 0.5 + len(layers) * (raster_h + trace_h)), dpi=100)
        grid = fig.subplots(2 * len(layers), 1, sharex=True,
                            height_ratios=[raster_h, trace_h] * len(layers))
        if title:
            fig.suptitle(title)
        for row, i in enumerate(layers):
            rec = record[i]
            events = rec[fam.events]  # (H, L)
            H, L = events.shape
            ax, axm = grid[2 * row], grid[2 * row + 1]
            size = _raster_marker_size(raster_h, H)
            t_all = np.arange(L)  # (L,)
            if ternary:
                for val, color in ((1, "tab:red"), (-1, "tab:blue")):
                    ch, t = np.nonzero(events == val)  # (n,) each
                    ax.scatter(t, ch, s=size, marker="|", color=color, linewidths=1.0,
                               label=text.legend.format(value=val), gid=f"raster.{i}.{val:+d}",
                               rasterized=len(t) > 20000)
                n = np.count_nonzero(events)
                ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)
            else:
                ch, t = np.nonzero(events)  # (n,) each
                ax.scatter(t, ch, s=size, marker="|", color="black", linewidths=1.0,
                           gid=f"raster.{i}", rasterized=len(t) > 20000)
                n = len(t)
            what = text.total.format(n=n)
            rate = (rates[i] if rates is not None and rates[i] is not None
                    else np.count_nonzero(events) / events.size)
            ax.set_title(f"Layer {i}: {what} (rate {rate:.3f} per {text.unit} per step)")
            ax.set_ylabel("channel\n(> : traced below)")
            ax.set_ylim(-0.5, H - 0.5)
            ax.set_xlim(-0.5, L - 0.5)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(False)
            value, ylabel, theta = _membrane(cfg, rec)
            chosen = trace_channels(events, np.abs(value) if ternary else value)
            for j, c in enumerate(chosen):
                color = f"C{j}"
                fired = np.flatnonzero(events[c])  # (n_c,)
                axm.plot(t_all, value[c], color=color, linewidth=1.0, gid=f"membrane.{i}.{c}",
                         drawstyle="steps-mid",  # one value per time step
                         label=f"channel {c} ({len(fired)} {text.count})")
                axm.plot(fired, value[c, fired], linestyle="none", marker="o", markersize=3.5,
                         color=color, gid=f"spikes.{i}.{c}")
                ax.plot([-0.5], [c], marker=">", color=color, markersize=5, clip_on=False,
                        linestyle="none")  # which raster rows are traced below
            if ternary:
                thr = np.ravel(theta)  # (L,) per time step
                axm.plot(t_all, thr, color="0.2", linestyle="--", linewidth=1,
                         drawstyle="steps-mid", gid=f"threshold.{i}", label=text.threshold)
                axm.plot(t_all, -thr, color="0.2", linestyle="--", linewidth=1,
                         drawstyle="steps-mid", gid=f"threshold.{i}.neg")
            else:
                axm.axhline(theta, color="0.2", linestyle="--", linewidth=1.2,
                            gid=f"threshold.{i}", label=text.threshold.format(theta=theta))
            axm.set_ylabel(ylabel)
            axm.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)
        grid[-1].set_xlabel("time step")
    return fig
