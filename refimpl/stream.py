"""A trained classifier run one time step at a time or in chunks (DESIGN.md section 10).

A spiking SSM is trained in its parallel form (FFT convolution, PMBC, the SDN over the whole
sequence) and deployed in its recurrent form. :class:`ModelStream` runs a model from
its parameters (or a checkpoint) in three forms that compute the same function:

- **parallel**: the blocks of :func:`refimpl.model.model_fwd` on the whole sequence
  (:meth:`ModelStream.parallel`);
- **step by step**: :meth:`ModelStream.step`, one time step in, one output and the new state
  out; the S4D layer runs its recurrence ``x = dA x + dB u``, ``y = 2 Re(C x) + D u`` (the form
  a chip runs), the neuron one step of its recursion, the SDN one window;
- **chunked**: :meth:`ModelStream.forward` on chunks of any length, each from the state the
  previous one ended in (the S4D layer's FFT form with its exact end state, PMBC or the neuron
  kernel from a state, the SDN on its window).

The model's output at step ``t`` is the classifier's prediction after ``t + 1`` steps: the
decoder applied to the mean of the last block's outputs so far, so the output at the last step
is the parallel form's logits. A language model (``head="lm"``) outputs the next-token
logits of step ``t``, ``decoder(h_t)``, exactly the parallel form's at position ``t`` up to
rounding (no pooling, no ``pool.sum``). Eval mode only: dropout off, BatchNorm with its running
statistics. A bidirectional model has no streaming form (its output at ``t`` reads later
inputs; :func:`stream_support` says so before anything runs). Streams are float64: a model
trained with ``dtype="float32"`` streams in float64 from its float64 master weights, what its
checkpoint stores (:meth:`ModelStream.from_model`): the model whose float32 rounding it trained,
so its outputs differ from the float32 forward's by that rounding only.

The state (:class:`StreamState`) holds flat named arrays, per layer ``i``:

| entry | shape, dtype | what |
|---|---|---|
| ``layers.i.ssm.x`` | ``(B, H, N2)`` complex128 | the S4D layer's modes after the last step |
| ``layers.i.neuron.u`` | ``(B, H)`` float64 | membrane after reset (neuron families) |
| ``layers.i.neuron.count`` | ``(B, H)`` int64 | refractory steps still blocked |
| ``layers.i.sdn.window`` | ``(B, H, 8)`` float64 | the SDN neuron's last 8 inputs |
| ``pool.sum`` | ``(B, H)`` float64 | running sum of the last block's outputs (classifiers) |

plus ``steps`` (time steps seen) and the ``fingerprint`` of the model that made it: a state is
refused by another model. The mixing layers (GLU, GSU), LayerNorm and eval BatchNorm are
stateless.

:func:`compare_forms` runs all three forms and reports the worst output error and spike
mismatches against bounds derived from the depth of the computation (:func:`tolerances`).
"""
import dataclasses
import hashlib
import json
import math
import time
from typing import NamedTuple

import numpy as np

from . import threads
from . import layers as Ly
from .model import block_fwd, block_stream, check_inputs, embed_fwd, layer_record, lm_decode
from .precision import require_reference
from .s4d import LAYER_PARAMS, s4d_step_coeffs

EPS = float(np.finfo(np.float64).eps)


class StreamState(NamedTuple):
    """A model stream's state between calls (see the module docstring for the entries)."""
    fingerprint: str  # the model that made it (ModelStream.fingerprint)
    steps: int  # time steps seen so far
    arrays: dict  # entry name -> array


def stream_support(cfg):
    """None when a model of ``cfg`` has a streaming form (:meth:`ModelStream.from_model` builds
    it), else the reason it has none, one line: a bidirectional model's output at step ``t``
    reads inputs after ``t``. A float32-trained model streams (in float64). Callers ask before
    they compute anything else, so that the refusal comes first."""
    if cfg.bidirectional:
        return ("a bidirectional model cannot stream: its output at step t reads inputs after "
                "t; train with bidirectional=False to deploy step by step")
    return None


def fingerprint(cfg, params, buffers):
    """A short hash of the model config, parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for tree in (params, buffers):
        for k in sorted(tree):
            a = np.ascontiguousarray(tree[k])
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


class ModelStream:
    """A trained classifier as a stream (module docstring).

    Parameters
    ----------
    cfg : refimpl.model.ModelConfig
        Causal (``bidirectional=False``).
    params, buffers : dict
        As :func:`refimpl.model.init_model` makes them or a checkpoint stores them.
    """

    def __init__(self, cfg, params, buffers):
        if cfg.dtype != "float64":
            raise ValueError(f"a {cfg.dtype} model cannot stream as such: streams are float64 "
                             f"(the reference form); ModelStream.from_model(cfg, params, "
                             f"buffers) streams it in float64 from its float64 master weights")
        require_reference("ModelStream")
        reason = stream_support(cfg)
        if reason:
            raise ValueError(reason)
        self.cfg, self.params, self.buffers = cfg, params, buffers
        self.trained_dtype = cfg.dtype  # from_model: the dtype the model was trained in
        self.family = cfg.family
        self.fingerprint = fingerprint(cfg, params, buffers)
        self._coeffs = []
        for i in range(cfg.n_layers):
            pre = f"layers.{i}.ssm."
            self._coeffs.append(s4d_step_coeffs({k: params[pre + k] for k in LAYER_PARAMS},
                                                cfg.disc))

    @classmethod
    def from_model(cls, cfg, params, buffers):
        """The stream of a trained model of any ``cfg.dtype``: a float32-trained model
        (``cfg.dtype == "float32"``) streams in float64 from ``params`` and ``buffers``, its
        float64 master copies (what the optimizer updated and a checkpoint stores; the float32
        forward rounds them), with ``cfg.dtype`` set to float64; ``trained_dtype`` keeps
        ``"float32"``. ValueError for a model :func:`stream_support` refuses, TypeError for
        float arrays that are not float64."""
        reason = stream_support(cfg)
        if reason:
            raise ValueError(reason)
        for tree, what in ((params, "params"), (buffers, "buffers")):
            bad = [k for k, v in tree.items() if v.dtype.kind == "f" and v.dtype != np.float64]
            if bad:
                raise TypeError(f"{what}[{bad[0]!r}] is {tree[bad[0]].dtype}: a stream runs "
                                f"from the float64 master weights (a checkpoint's params and "
                                f"buffers), never from a rounded copy")
        stream = cls(dataclasses.replace(cfg, dtype="float64"), params, buffers)
        stream.trained_dtype = cfg.dtype
        return stream

    @classmethod
    def from_checkpoint(cls, path):
        """The stream of a checkpoint file (:func:`refimpl.train.load_checkpoint`), of any
        training dtype (:meth:`from_model`)."""
        from .train import load_checkpoint
        ck = load_checkpoint(path)
        return cls.from_model(ck.cfg, ck.params, ck.buffers)

    # ---------------------------------------------------------------------------------------
    # State
    # ---------------------------------------------------------------------------------------

    def state_spec(self, batch):
        """``{entry: (shape, dtype)}`` of a state for ``batch`` sequences."""
        cfg = self.cfg
        H, N2 = cfg.d_model, cfg.d_state // 2
        spec = {}
        for i in range(cfg.n_layers):
            spec[f"layers.{i}.ssm.x"] = ((batch, H, N2), np.complex128)
            for k, v in self.family.state_spec(batch, H).items():
                spec[f"layers.{i}.{k}"] = v
        if cfg.head == "classifier":  # a language model decodes every step: no pooling state
            spec["pool.sum"] = ((batch, H), np.float64)
        return spec

    def init_state(self, batch):
        """The zero state for ``batch`` sequences (before the first step)."""
        if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        arrays = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
                  self.state_spec(int(batch)).items()}
        return StreamState(self.fingerprint, 0, arrays)

    def check_state(self, state, batch):
        """Validate ``state`` for ``batch`` sequences; raises naming the offending entry."""
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a refimpl.stream.StreamState (from init_state or a "
                            f"previous step), got {type(state).__name__}")
        spec = self.state_spec(batch)
        arrays = state.arrays if isinstance(state.arrays, dict) else {}
        extra = sorted(set(arrays) - set(spec))
        missing = sorted(set(spec) - set(arrays))
        if extra or missing:
            what = (f"has entry {extra[0]!r}, which this model does not use" if extra
                    else f"is missing entry {missing[0]!r}")
            raise ValueError(f"state {what}: it belongs to another model (this one: "
                             f"activation {self.cfg.activation!r}, {self.cfg.n_layers} layers); "
                             f"start from init_state({batch})")
        if state.fingerprint != self.fingerprint:
            raise ValueError(f"state.fingerprint {state.fingerprint!r} is not this model's "
                             f"({self.fingerprint!r}): the state was made by another checkpoint "
                             f"or parameters; start from init_state({batch})")
        if not isinstance(state.steps, (int, np.integer)) or state.steps < 0:
            raise ValueError(f"state.steps must be an int >= 0, got {state.steps!r}")
        R = self.cfg.neuron_config().refractory_steps if self.family.neuron else 0
        for k, (shape, dtype) in spec.items():
            a = arrays[k]
            name = f"state.arrays[{k!r}]"
            if not isinstance(a, np.ndarray) or a.dtype != dtype:
                got = getattr(a, "dtype", type(a).__name__)
                raise TypeError(f"{name} must be a {np.dtype(dtype).name} array, got {got}; "
                                "states are never cast")
            if a.shape != shape:
                raise ValueError(f"{name} must have shape {shape} (batch {batch}), got {a.shape}")
            if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
                i = tuple(int(j) for j in np.argwhere(~np.isfinite(a))[0])
                raise ValueError(f"{name} is not finite at {list(i)}: {a[i]}")
            if k.endswith("neuron.count") and a.size and (a.min() < 0 or a.max() > R):
                raise ValueError(f"{name} must lie in [0, refractory_steps = {R}], got range "
                                 f"[{a.min()}, {a.max()}]")
        return state

    # ---------------------------------------------------------------------------------------
    # The three forms
    # ---------------------------------------------------------------------------------------

    def _run(self, x, state, step, record):
        """Shared body of :meth:`step` (``step=True``, ``x (B, 1, ...)``) and :meth:`forward`."""
        cfg, p, buf = self.cfg, self.params, self.buffers
        B, T = x.shape[0], x.shape[1]
        self.check_state(state, B)
        arrays = state.arrays
        h, _ = embed_fwd(cfg, p, x)  # (B, H, T)
        new, records = {}, []
        for i in range(cfg.n_layers):
            pre = f"layers.{i}."
            layer = {k[len(pre):]: v for k, v in arrays.items() if k.startswith(pre)}
            h, st, rec = block_stream(cfg, p, buf, i, h, layer,
                                      step=self._coeffs[i] if step else None)
            new.update({pre + k: v for k, v in st.items()})
            records.append(rec)
        if cfg.head == "lm":
            logits = lm_decode(cfg, p, h)  # (B, T, V): the next-token logits after each step
        else:
            csum = arrays["pool.sum"][:, :, None] + np.cumsum(h, axis=2)  # (B, H, T)
            n = state.steps + np.arange(1, T + 1)  # (T,) steps seen after each output
            pooled = (csum / n).transpose(0, 2, 1)  # (B, T, H)
            logits = pooled @ p["decoder.W"].T + p["decoder.b"]  # (B, T, C)
            new["pool.sum"] = np.ascontiguousarray(csum[:, :, -1])
        out_state = StreamState(self.fingerprint, state.steps + T, new)
        if record:
            return logits, out_state, records
        return logits, out_state

    @threads.owned()
    def step(self, x_t, state, record=False):
        """One time step: ``x_t`` float64 ``(B, d_input)`` (or ``(B,)`` when ``d_input = 1``), or
        int64 tokens ``(B,)``. Returns ``(logits (B, n_classes), new_state)`` (and, with
        ``record``, per layer the arrays of :func:`refimpl.model.block_stream`, time axis of
        length 1)."""
        if not isinstance(x_t, np.ndarray):
            raise TypeError(f"x_t must be a numpy array, got {type(x_t).__name__}")
        if x_t.ndim not in (1, 2):
            raise ValueError(f"x_t must have shape (B,) or (B, d_input) (one time step), got "
                             f"{x_t.shape}")
        x = check_inputs(self.cfg, x_t[:, None])  # (B, 1, ...)
        out = self._run(x, state, True, record)
        return (out[0][:, 0],) + out[1:]

    def forward(self, x, state=None, record=False):
        """One chunk ``x`` (as :func:`refimpl.model.model_fwd` takes a sequence, any length
        ``T >= 1``) from ``state`` (None: the zero state). Returns ``(logits (B, T, n_classes),
        new_state)`` with the output after every step of the chunk (and records with
        ``record``)."""
        x = check_inputs(self.cfg, x)
        state = self.init_state(x.shape[0]) if state is None else state
        return self._run(x, state, False, record)

    @threads.owned()
    def run(self, x, chunks=None, record=False, progress=None):
        """The whole sequence ``x`` from the zero state, split into ``chunks``: None (one
        chunk), an int (that length, the last chunk shorter), a sequence of lengths summing to
        ``L``, or ``"step"`` (one :meth:`step` per time step). Returns ``logits (B, L,
        n_classes)`` (and per-layer records concatenated over time with ``record``).
        ``progress(n)`` is called after each chunk with its length."""
        x = check_inputs(self.cfg, x)
        B, L = x.shape[0], x.shape[1]
        sizes = _chunk_sizes(chunks, L)
        state = self.init_state(B)
        outs, recs, t = [], [], 0
        for n in sizes:
            if chunks == "step":
                res = self._run(x[:, t:t + 1], state, True, record)
            else:
                res = self._run(x[:, t:t + n], state, False, record)
            outs.append(res[0])
            state = res[1]
            if record:
                recs.append(res[2])
            t += n
            if progress is not None:
                progress(n)
        logits = np.concatenate(outs, axis=1)  # (B, L, C)
        if not record:
            return logits
        merged = [{k: np.concatenate([r[i][k] for r in recs], axis=2) for k in recs[0][i]}
                  for i in range(self.cfg.n_layers)]
        return logits, merged

    def parallel(self, x, record=False):
        """The parallel form (the blocks of :func:`refimpl.model.model_fwd`, eval mode) with
        the outputs of :meth:`run`: ``logits (B, L, n_classes)`` after every step (the last
        equals ``model_fwd``'s logits up to the pooling's summation order) and, with ``record``,
        the per-layer arrays of :meth:`step` from the blocks' caches, plus ``norm_gain``: how
        much the layer's norm can amplify a relative error (see :func:`tolerances`)."""
        cfg, p, buf = self.cfg, self.params, self.buffers
        x = check_inputs(cfg, x)
        h, _ = embed_fwd(cfg, p, x)  # (B, H, L)
        recs = []
        for i in range(cfg.n_layers):
            h_in = h
            h, c, _ = block_fwd(cfg, p, buf, i, h, False, None, new_buf={})
            rec = {**layer_record(cfg, c, h), "norm_gain": _norm_gain(cfg, c, h_in, h)}
            recs.append(rec)
        if cfg.head == "lm":
            logits = lm_decode(cfg, p, h)  # (B, L, V): model_fwd's logits exactly
        else:
            n = np.arange(1, h.shape[2] + 1)
            pooled = (np.cumsum(h, axis=2) / n).transpose(0, 2, 1)  # (B, L, H)
            logits = pooled @ p["decoder.W"].T + p["decoder.b"]  # (B, L, C)
        return (logits, recs) if record else logits


def _norm_gain(cfg, c, h_in, h_out):
    """Relative-error amplification of a block's norm: ``max|norm input| * max slope /
    max(1, max|norm output|)`` with slope ``2 rstd |gamma|`` (LayerNorm, per token: the mean
    and variance terms add at most one more ``rstd``) or ``rstd |gamma|`` (eval BatchNorm)."""
    norm = c.norm  # the LayerNorm or BatchNorm op's cache: both hold xh, rstd, gamma
    if cfg.prenorm:
        x_in = h_in
        out = norm.xh * norm.gamma[:, None]  # xh gamma, the norm's output before beta
    else:
        x_in = h_in + c.mixed  # the post-norm's input: the residual plus the mixing output
        out = h_out
    rstd, gamma = norm.rstd, norm.gamma
    if cfg.norm == "layer":
        slope = 2.0 * float(rstd.max()) * float(np.abs(gamma).max())
    else:
        slope = float((rstd * np.abs(gamma)).max())
    return float(np.abs(x_in).max()) * slope / max(1.0, float(np.abs(out).max()))


def _chunk_sizes(chunks, L):
    if chunks is None:
        return [L]
    if isinstance(chunks, str):
        if chunks != "step":
            raise ValueError(f"chunks must be None, an int, a list of ints or 'step', got "
                             f"{chunks!r}")
        return [1] * L
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        return [min(chunks, L - t) for t in range(0, L, chunks)]
    sizes = [int(n) for n in chunks]
    if any(n < 1 for n in sizes) or sum(sizes) != L:
        raise ValueError(f"chunk lengths must be >= 1 and sum to L = {L}, got {sizes}")
    return sizes


# --------------------------------------------------------------------------------------------
# Equivalence of the three forms
# --------------------------------------------------------------------------------------------


def tolerances(cfg, L, records):
    """Bounds on the difference between two forms of one model, from the depth of the
    computation: a relative error of ``eps`` per rounded operation, times the number of rounded
    operations a value depends on, times its scale.

    Per layer, a value passes through the FFT convolution or the recurrence (``2 log2(n)``
    butterfly stages of the FFT, or up to ``L`` steps of ``x = dA x + dB u`` for modes with
    ``|dA|`` near 1, plus the ``N2``-term sum ``2 Re sum C x`` and the exact end state's
    ``L``-term sums), the mixing layer and the norm (sums over ``H`` channels, twice each) and
    a few elementwise operations (16): ``2 log2(2L) + 2L + N2 + 4H + 16``. A layer passes the
    relative error of its input on multiplied by its norm's gain (``norm_gain`` of the parallel
    records, measured on the reference values like a golden case's scale); the running mean
    over time adds ``L`` additions (a language model's per-token decoder ``H``). The bound is
    16 times that (the constants of the classical summation bounds, as for the golden
    tolerances).

    Returns ``{"membrane": [bound per layer on what decides the spikes, absolute],
    "logits": bound relative to max(1, max|logits|)}``.
    """
    H, N2 = cfg.d_model, cfg.d_state // 2
    layer_depth = 2 * math.ceil(math.log2(2 * L)) + 2 * L + N2 + 4 * H + 16
    depth, membrane = 0.0, []
    for rec in records:
        depth += layer_depth
        scale = max(1.0, float(np.abs(rec["v"]).max()))
        membrane.append(16 * EPS * depth * scale)
        depth *= max(1.0, rec["norm_gain"])
    readout = L if cfg.head == "classifier" else H  # the running mean, or the decoder's sums
    return {"membrane": membrane, "logits": 16 * EPS * (depth + readout)}


def compare_forms(stream, x, chunks):
    """Run ``x`` in the parallel form, step by step and in ``chunks``, and compare.

    Spikes: per batch row, the first time step at which any layer's spikes differ from the
    parallel form's is found; the differing spikes of the lowest such layer at that step are
    *flips* if the parallel margin there (``|membrane - threshold|``) is within the layer's
    membrane bound (rounding can decide them; counted) and *mismatches* otherwise (a failure).
    Everything at or after that step, and in higher layers, follows from the flip and is not
    compared. Values: the membranes (``v``, what each layer's activation reads) and the
    logits at every step before a row's first flip, against :func:`tolerances`.

    Returns a dict: ``worst_error`` (logits, relative to ``max(1, max|logits|)``),
    ``logit_bound``, ``worst_membrane`` (max over layers of error / bound, <= 1 passes),
    ``flips``, ``mismatches``, ``flipped_rows``, ``bounds``.
    """
    cfg = stream.cfg
    x = check_inputs(cfg, x)
    B, L = x.shape[0], x.shape[1]
    ref, ref_rec = stream.parallel(x, record=True)
    bounds = tolerances(cfg, L, ref_rec)
    scale = max(1.0, float(np.abs(ref).max()))
    out = {"worst_error": 0.0, "logit_bound": bounds["logits"], "worst_membrane": 0.0,
           "flips": 0, "mismatches": 0, "flipped_rows": set(), "bounds": bounds}
    for form in ("step", chunks):
        logits, rec = stream.run(x, form, record=True)
        for b in range(B):
            t1, layer, diff = L, None, None
            for i, (r0, r1) in enumerate(zip(ref_rec, rec)):
                for name in _spike_names(r0):
                    d = r0[name][b] != r1[name][b]  # (H, L)
                    steps = np.nonzero(d.any(axis=0))[0]
                    if steps.size and steps[0] < t1:
                        t1, layer, diff = int(steps[0]), i, (name, d[:, steps[0]])
            if layer is not None:
                name, d = diff
                margin = _margin(cfg, ref_rec[layer], name)[b, :, t1]  # (H,)
                ok = margin <= bounds["membrane"][layer]
                out["flips"] += int((d & ok).sum())
                out["mismatches"] += int((d & ~ok).sum())
                out["flipped_rows"].add(b)
            if t1 == 0:
                continue
            err = float(np.abs(logits[b, :t1] - ref[b, :t1]).max()) / scale
            out["worst_error"] = max(out["worst_error"], err)
            for i, (r0, r1) in enumerate(zip(ref_rec, rec)):
                e = float(np.abs(r0["v"][b, :, :t1] - r1["v"][b, :, :t1]).max())
                out["worst_membrane"] = max(out["worst_membrane"], e / bounds["membrane"][i])
    out["flipped_rows"] = sorted(out["flipped_rows"])
    return out


def _spike_names(rec):
    return [k for k in ("s", "Tx") if k in rec]


def _margin(cfg, rec, name):
    """``|value - threshold|`` of what decided the spikes ``name`` in a parallel record (the
    family's :meth:`~refimpl.activations.Activation.margins`)."""
    return cfg.family.margins(rec)[name]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_stream(stream, x, y, batch_size=64, progress=None, predictions=None):
    """Run a test set step by step (the sequences of a batch in lockstep); returns
    ``{"accuracy", "loss", "steps_per_second", "latency_ms" (median per step), "latency_p99_ms",
    "steps"}``. ``progress(n)`` is called after each step with the number of sequences it
    advanced; a list given as ``predictions`` receives the predicted classes."""
    x = check_inputs(stream.cfg, x)
    N, L = x.shape[0], x.shape[1]
    correct, loss_sum, times = 0, 0.0, []
    for start in range(0, N, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        state = stream.init_state(len(xb))
        for t in range(L):
            t0 = time.perf_counter()
            logits, state = stream.step(xb[:, t], state)
            times.append(time.perf_counter() - t0)
            if progress is not None:
                progress(len(xb))
        loss, _ = Ly.cross_entropy_fwd(logits, yb)
        if predictions is not None:
            predictions.extend(logits.argmax(1).tolist())
        loss_sum += loss * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    times = np.array(times)
    return {"accuracy": correct / N, "loss": loss_sum / N, "steps": N * L,
            "steps_per_second": N * L / times.sum(),
            "latency_ms": float(np.median(times) * 1e3),
            "latency_p99_ms": float(np.percentile(times, 99) * 1e3)}
