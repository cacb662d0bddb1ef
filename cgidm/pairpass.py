"""The pair pass: both models' forwards of one PGD step, as one callable.

A pair pass is ``pair_fn(x_ft, x_pre, t, cond_ft, cond_pre) -> (eps_ft, eps_pre)`` with

- ``x_ft``, ``x_pre``: ``[N, C, H, W]`` noised latents of the fine-tuned and the pretrained
  model (the same tensor under shared noise);
- ``t``: ``[N]`` int64 timesteps, the same for both models;
- ``cond_ft``, ``cond_pre``: ``[N, L, D]`` prompt embeddings of each model's text encoder;
- ``eps_ft``, ``eps_pre``: ``[N, C, H, W]``, in the models' dtype,

differentiable with respect to ``x_ft`` and ``x_pre`` (the engine takes the input gradient
through it; weights are frozen and never get a gradient). Inputs are cast to the models'
dtype, as ``reference.unet_eps_fn`` does.

Variants, by kind of pair (``PAIR_KINDS``):

- any pair: ``sequential`` — two calls, the baseline; for a LoRA pair it needs two copies
  of the base UNet (the adapted one and the plain one);
- ``"lora"`` (the fine-tune is the base UNet plus PEFT LoRA adapters):
  ``lora_toggle`` — one copy of the weights, the pretrained side runs with the adapters
  switched off (half the weight memory of two copies, same work as ``sequential``);
  ``lora_fused`` — one base pass over ``cat([x_ft, x_pre])`` (every base weight read once
  for both sides, GEMMs twice as tall), the low-rank branch computed on the fine-tuned
  half only;
- ``"same"`` (one UNet on both sides: a LoRA on the text encoder only, so only the
  prompts differ): ``sequential`` only. ``stacked`` would hold the same weights twice;
- ``"full"`` (two UNets of one architecture): ``stacked`` — both models' weights stacked
  and run as one ``torch.vmap`` over the model dimension (convolutions become one grouped
  convolution, linears one batched GEMM); ``two_streams`` — the two forwards on two CUDA
  streams (CUDA only).

Which variant is fastest depends on the GPU, the dtype and the batch; ``choose`` picks the
fastest one measured on this device (``bench/bench_pairpass.py``) and otherwise the safe
default (``DEFAULT``). Every variant is checked against ``sequential`` in
``tests/test_pairpass.py``: outputs and input gradients agree to 1e-5 of their largest
magnitude in fp32 (the error of batched against unbatched fp32 convolutions and GEMMs:
different batch sizes take different blockings, so sums run in a different order).
"""
from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from cgidm.reference import EpsFn, takes_unet_call, unet_eps_fn

log = logging.getLogger(__name__)

# pair_fn(x_ft [N,C,H,W], x_pre [N,C,H,W], t [N], cond_ft [N,L,D], cond_pre [N,L,D]) -> (eps_ft, eps_pre)
PairFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
Model = Union[torch.nn.Module, EpsFn]

PAIR_KINDS = ("lora", "same", "full")
# The names ``choose`` may return for each kind. A LoRA pair's ``sequential`` (two copies
# of the base) is timed by the bench as the baseline but never chosen: it costs a second
# copy of the UNet for the same work as ``lora_toggle``.
VARIANTS = {"lora": ("lora_toggle", "lora_fused"), "same": ("sequential",), "full": ("sequential", "stacked", "two_streams")}
# Without a measurement on this device: the variant that is never slower than two plain
# calls and never holds more memory (lora_toggle runs exactly sequential's kernels).
DEFAULT = {"lora": "lora_toggle", "same": "sequential", "full": "sequential"}


def variants(pair_kind: str) -> tuple[str, ...]:
    """The variants ``choose`` may pick for ``pair_kind`` (``"lora"`` or ``"full"``)."""
    _check_kind(pair_kind)
    return VARIANTS[pair_kind]


def _check_kind(pair_kind: str) -> None:
    if pair_kind not in PAIR_KINDS:
        raise ValueError(f"pair kind {pair_kind!r} is not one of {PAIR_KINDS}")


def _eps_fn(model: Model) -> EpsFn:
    return unet_eps_fn(model) if isinstance(model, torch.nn.Module) else model


class PairPass:
    """A pair pass with a name (``PairFn``); subclasses implement ``__call__``."""

    name = ""

    def __call__(
        self,
        x_ft: torch.Tensor,  # [N, C, H, W]
        x_pre: torch.Tensor,  # [N, C, H, W]
        t: torch.Tensor,  # [N] int64
        cond_ft: torch.Tensor,  # [N, L, D]
        cond_pre: torch.Tensor,  # [N, L, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pair pass {self.name}>"


# --------------------------------------------------------------------------- sequential


class _Sequential(PairPass):
    name = "sequential"

    def __init__(self, model_ft: Model, model_pre: Model):
        self.fn_ft = _eps_fn(model_ft)
        self.fn_pre = _eps_fn(model_pre)

    def __call__(self, x_ft, x_pre, t, cond_ft, cond_pre):
        return self.fn_ft(x_ft, t, cond_ft), self.fn_pre(x_pre, t, cond_pre)


def sequential(model_ft: Model, model_pre: Model) -> PairPass:
    """Two calls: ``model_ft`` then ``model_pre`` (modules wrapped by ``unet_eps_fn``,
    ``EpsFn`` callables used as they are)."""
    return _Sequential(model_ft, model_pre)


# --------------------------------------------------------------------------- LoRA pairs


def _lora_layers(unet: torch.nn.Module) -> list:
    """The PEFT LoRA layers of ``unet`` that have an active adapter; raises ``ValueError``
    when there is none, or when an adapter is merged into the base weights (then the base
    weights are not the pretrained model's, and switching adapters off would unmerge them
    in place)."""
    from cgidm.lora import adapter_layers

    layers = adapter_layers(unet)
    active = [m for m in layers if any(a in m.lora_A for a in m.active_adapters)]
    if not active:
        raise ValueError("the UNet has no active LoRA adapter (load one with unet.load_lora_adapter)")
    if any(m.merged for m in layers):
        raise ValueError("a LoRA adapter is merged into the base weights: unmerge it (unet.unfuse_lora()) first")
    if not all(hasattr(m, "_disable_adapters") for m in layers):
        raise NotImplementedError("this PEFT version has no per-layer _disable_adapters flag")
    return layers


class _LoraToggle(PairPass):
    """One copy of the weights; the pretrained side runs with every LoRA layer's
    ``_disable_adapters`` flag set. The flag is set directly: PEFT's ``enable_adapters``
    (and diffusers' ``unet.enable_adapters()``) also turns ``requires_grad`` back on for
    the adapter weights, which would make autograd save activations for weight
    gradients the engine never takes."""

    name = "lora_toggle"

    def __init__(self, unet: torch.nn.Module):
        self.layers = _lora_layers(unet)
        self.fn = unet_eps_fn(unet)

    def _run(self, disabled: bool, x, t, cond):
        from cgidm.lora import adapters_disabled

        with adapters_disabled(self.layers, disabled):
            return self.fn(x, t, cond)

    def __call__(self, x_ft, x_pre, t, cond_ft, cond_pre):
        return self._run(False, x_ft, t, cond_ft), self._run(True, x_pre, t, cond_pre)


def lora_toggle(unet_with_adapter: torch.nn.Module) -> PairPass:
    """The LoRA pair from ONE copy of the weights: the fine-tuned side with the active
    adapters on (at the scales set with ``set_adapters``), the pretrained side with them
    off. The UNet's adapter state is restored after each call."""
    return _LoraToggle(unet_with_adapter)


class _LoraFused(PairPass):
    """One base pass over ``cat([x_ft, x_pre])``; on every LoRA layer the low-rank branch
    ``lora_B(lora_A(dropout(x))) * scaling`` sees only the first (fine-tuned) half: a
    forward pre-hook on ``lora_A`` slices its input to the first ``n`` rows and a forward
    hook on ``lora_B`` pads its output with ``n`` zero rows, so the pretrained half gets
    the base layer alone (exactly, in value and gradient) and the branch costs half.

    The hooks stay registered on the UNet (``remove()`` takes them off) and act only
    during a call of this pass; they check that each LoRA layer sees the ``2n`` rows of
    the pair batch. Not reentrant: one call at a time."""

    name = "lora_fused"

    def __init__(self, unet: torch.nn.Module):
        layers = _lora_layers(unet)
        for m in layers:
            if any(a in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(a, False)
                   for a in m.active_adapters):
                raise NotImplementedError(
                    "lora_fused composes plain LoRA only (base + B(A(x)) * scaling); this UNet has a LoRA "
                    "variant (DoRA or similar) whose output is not that sum: use lora_toggle"
                )
        self.fn = unet_eps_fn(unet)
        self._n: Optional[int] = None
        self._handles = []
        from cgidm.checkpointing import register

        register(self)  # --low-memory: a recompute sees the call's half-batch size
        for m in layers:
            for a in m.lora_A:
                self._handles.append(m.lora_A[a].register_forward_pre_hook(self._first_half))
                self._handles.append(m.lora_B[a].register_forward_hook(self._pad))

    def _first_half(self, module, args):
        n = self._n
        if n is None:
            return None
        x = args[0]
        if x.shape[0] != 2 * n:
            raise RuntimeError(
                f"lora_fused: a LoRA layer saw a batch of {x.shape[0]} rows, not the pair batch of {2 * n}"
            )
        return (x[:n], *args[1:])

    def _pad(self, module, args, out):
        n = self._n
        if n is None:
            return None
        return torch.cat([out, out.new_zeros((n, *out.shape[1:]))])

    def capture_state(self):
        """``checkpointing.StateHolder``: the half-batch size of the call running now."""
        import contextlib

        n = self._n

        @contextlib.contextmanager
        def restore():
            before, self._n = self._n, n
            try:
                yield
            finally:
                self._n = before

        return restore

    def remove(self) -> None:
        """Take the hooks off the UNet."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __call__(self, x_ft, x_pre, t, cond_ft, cond_pre):
        if not self._handles:
            raise RuntimeError("lora_fused: hooks removed")
        n = x_ft.shape[0]
        if x_pre.shape != x_ft.shape or cond_pre.shape != cond_ft.shape:
            raise ValueError(
                f"lora_fused needs both sides of one shape: x {tuple(x_ft.shape)} vs {tuple(x_pre.shape)}, "
                f"cond {tuple(cond_ft.shape)} vs {tuple(cond_pre.shape)}"
            )
        self._n = n
        try:
            eps = self.fn(torch.cat([x_ft, x_pre]), torch.cat([t, t]), torch.cat([cond_ft, cond_pre]))
        finally:
            self._n = None
        return eps[:n], eps[n:]


def lora_fused(unet_with_adapter: torch.nn.Module) -> PairPass:
    """The LoRA pair as one base pass over both halves of the batch, the low-rank delta on
    the fine-tuned half only. Plain LoRA only (``NotImplementedError`` for DoRA and other
    PEFT variants). Registers hooks on the UNet's LoRA modules (``.remove()``)."""
    return _LoraFused(unet_with_adapter)


# --------------------------------------------------------------------------- full pairs


_FALLBACK_MESSAGE = "There is a performance drop because we have not yet implemented the batching rule"
_FALLBACK = re.compile(r"batching rule for (\S+?)\. ")


class _Stacked(PairPass):
    """``torch.func.functional_call`` of a weightless (meta) copy of the architecture,
    vmapped over the stacked weights ``[2, ...]`` of the two models.

    diffusers' UNet runs under ``vmap``: every op has a batching rule except PyTorch's
    fused attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` on CPU
    with torch 2.13), which vmap runs through its per-slice fallback — one attention
    call per model, correct, with a warning per call that is silenced here and logged
    once at debug level (``fallback_ops``)."""

    name = "stacked"

    def __init__(self, model_ft: torch.nn.Module, model_pre: torch.nn.Module):
        from torch.func import functional_call, stack_module_state

        if not (isinstance(model_ft, torch.nn.Module) and isinstance(model_pre, torch.nn.Module)):
            raise TypeError("stacked needs two modules (their weights are stacked)")
        if not (takes_unet_call(model_ft) and takes_unet_call(model_pre)):
            raise TypeError("stacked calls both models as diffusers UNets (encoder_hidden_states=...)")
        if type(model_ft) is not type(model_pre):
            raise ValueError(f"stacked needs one architecture: {type(model_ft).__name__} vs {type(model_pre).__name__}")
        s_ft, s_pre = model_ft.state_dict(), model_pre.state_dict()
        if {k: v.shape for k, v in s_ft.items()} != {k: v.shape for k, v in s_pre.items()}:
            raise ValueError("stacked needs one architecture: the two models' weights differ in names or shapes")
        # a stacked copy of both models' weights; the models' own tensors then become views
        # of it, so the weights are held once (the pair still holds both models)
        self.params, self.buffers = stack_module_state([model_ft, model_pre])
        for p in self.params.values():
            p.requires_grad_(False)
        for i, model in enumerate((model_ft, model_pre)):
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                t.data = (self.params if name in self.params else self.buffers)[name][i]
        self.dtype = next(iter(self.params.values())).dtype
        # the architecture without weights: deepcopy with every weight pre-mapped to a meta
        # tensor, so no third copy of the weights is ever made
        memo = {id(p): torch.nn.Parameter(p.detach().to("meta"), requires_grad=False) for p in model_ft.parameters()}
        memo.update({id(b): b.detach().to("meta") for b in model_ft.buffers()})
        self.base = copy.deepcopy(model_ft, memo)
        # checkpointing cannot run under vmap: this pass keeps every activation (--low-memory
        # picks another pass, cgidm.pipeline)
        from cgidm.checkpointing import set_gradient_checkpointing

        set_gradient_checkpointing([self.base], False)
        self.fallback_ops: Optional[list[str]] = None

        def call(params, buffers, x, t, cond):
            return functional_call(self.base, (params, buffers), (x, t),
                                   {"encoder_hidden_states": cond, "return_dict": False})[0]

        self._vmapped = torch.vmap(call, in_dims=(0, 0, 0, None, 0))

    def __call__(self, x_ft, x_pre, t, cond_ft, cond_pre):
        x = torch.stack([x_ft, x_pre]).to(self.dtype)  # [2, N, C, H, W]
        cond = torch.stack([cond_ft, cond_pre]).to(self.dtype)  # [2, N, L, D]
        first = self.fallback_ops is None
        with warnings.catch_warnings(record=first) as seen:
            if first:
                warnings.simplefilter("always")
            else:
                warnings.filterwarnings("ignore", message=_FALLBACK_MESSAGE)
            eps = self._vmapped(self.params, self.buffers, x, t, cond)
        if first:
            ops = set()
            for w in seen:
                m = _FALLBACK.search(str(w.message))
                if m:
                    ops.add(m.group(1))
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self.fallback_ops = sorted(ops)
            if ops:
                log.debug("stacked: vmap runs these ops one model at a time (no batching rule): %s", ", ".join(ops))
        return eps[0], eps[1]


def stacked(model_ft: torch.nn.Module, model_pre: torch.nn.Module) -> PairPass:
    """Both models' weights stacked (``torch.func.stack_module_state``; the models' own
    weights become views of the stack) and run as one ``vmap`` over the model dimension."""
    return _Stacked(model_ft, model_pre)


class _TwoStreams(PairPass):
    """The fine-tuned forward on the current stream, the pretrained one on a side stream
    that first waits for the current stream (its inputs are written there). Tensors made
    on one stream and read on the other are ``record_stream``-ed so the caching allocator
    does not hand their memory out again while the other stream may still read it; the
    current stream waits for the side stream before the outputs are returned. Autograd
    runs each backward op on its forward op's stream, so the backward overlaps too."""

    name = "two_streams"

    def __init__(self, model_ft: Model, model_pre: Model):
        for m in (model_ft, model_pre):
            if isinstance(m, torch.nn.Module):
                p = next(m.parameters(), None)
                if p is not None and p.device.type != "cuda":
                    raise RuntimeError(f"two_streams needs CUDA models, got weights on {p.device}")
        self.fn_ft = _eps_fn(model_ft)
        self.fn_pre = _eps_fn(model_pre)
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, x_ft, x_pre, t, cond_ft, cond_pre):
        device = x_ft.device
        if device.type != "cuda":
            raise RuntimeError(f"two_streams needs CUDA tensors, got {device}")
        main = torch.cuda.current_stream(device)
        side = self._side.get(device)
        if side is None:
            side = self._side[device] = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            eps_pre = self.fn_pre(x_pre, t, cond_pre)
        for tensor in (x_pre, t, cond_pre):
            tensor.record_stream(side)
        eps_ft = self.fn_ft(x_ft, t, cond_ft)
        main.wait_stream(side)
        eps_pre.record_stream(main)
        return eps_ft, eps_pre


def two_streams(model_ft: Model, model_pre: Model) -> PairPass:
    """The two forwards on two CUDA streams (``RuntimeError`` off CUDA)."""
    return _TwoStreams(model_ft, model_pre)


# --------------------------------------------------------------------------- choice


def build(name: str, model_ft: Model, model_pre: Optional[Model] = None) -> PairPass:
    """The variant ``name`` for a pair. LoRA variants take the adapted UNet as
    ``model_ft`` and no ``model_pre``; the others take both models."""
    if name in ("lora_toggle", "lora_fused"):
        if model_pre is not None:
            raise ValueError(f"{name} runs both sides from the adapted UNet: pass no model_pre")
        return lora_toggle(model_ft) if name == "lora_toggle" else lora_fused(model_ft)
    if model_pre is None:
        raise ValueError(f"{name} needs both models")
    makers = {"sequential": sequential, "stacked": stacked, "two_streams": two_streams}
    if name not in makers:
        raise ValueError(f"unknown pair pass {name!r}; one of {sorted({*makers, 'lora_toggle', 'lora_fused'})}")
    return makers[name](model_ft, model_pre)


def device_key(device: Union[torch.device, str]) -> str:
    """The key of a device in measurements: ``cpu``, or the CUDA device's name in lower
    case with runs of other characters as ``-`` (``nvidia-h200``), as the benchmark
    names its result file. A string that is not a torch device is taken as a key."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return device
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def measured_from_rows(rows: Iterable[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """``{device_key: {pair_kind: {variant: median seconds}}}`` from rows of
    ``bench/results/pairpass-<device>.json`` (later rows replace earlier ones)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        key = row.get("device_key")
        for r in row.get("results", ()):
            if key and r.get("ok") and r.get("median_ms") is not None:
                out.setdefault(key, {}).setdefault(r["kind"], {})[r["variant"]] = r["median_ms"] / 1e3
    return out


def choose(
    pair_kind: str,
    device: Union[torch.device, str],
    measured: Optional[Mapping[str, Mapping[str, Mapping[str, float]]]] = None,
) -> tuple[str, str]:
    """``(name, why)``: the fastest variant of ``pair_kind`` measured on ``device``
    (``measured`` as ``measured_from_rows`` returns it: seconds per forward + input
    backward), or ``DEFAULT[pair_kind]`` when this device has no measurement of a
    variant that can run here (``two_streams`` needs CUDA)."""
    _check_kind(pair_kind)
    key = device_key(device)
    dev_type = key if key == "cpu" else "cuda"
    here = dict((measured or {}).get(key, {}).get(pair_kind, {}))
    timed = {
        name: float(s) for name, s in here.items()
        if name in VARIANTS[pair_kind] and s is not None and math.isfinite(float(s)) and float(s) > 0
        and not (name == "two_streams" and dev_type != "cuda")
    }
    if not timed:
        name = DEFAULT[pair_kind]
        why = {"lora": "one copy of the UNet, the same kernels as two passes",
               "same": "one UNet, two plain passes", "full": "two plain passes"}[pair_kind]
        return name, f"no measurement of a {pair_kind} pair pass on {key}: the safe default {name} ({why})"
    name = min(timed, key=timed.get)
    others = ", ".join(f"{n} {timed[n] * 1e3:.3g} ms" for n in sorted(timed, key=timed.get) if n != name)
    return name, f"fastest measured on {key}: {name} {timed[name] * 1e3:.3g} ms" + (f" (vs {others})" if others else "")


def pair_kind(model_ft: Model, model_pre: Model) -> tuple[str, bool]:
    """``(kind, shared)``: ``("lora", True)`` when ``model_pre`` is ``model_ft`` with its
    adapters off (``cgidm.lora.AdaptersOff``: a LoRA pair holding one copy of the base),
    ``("same", False)`` when both sides are one module (a text-encoder-only LoRA), else
    ``("full", False)``."""
    from cgidm.lora import AdaptersOff

    if isinstance(model_pre, AdaptersOff) and model_pre.adapted is model_ft:
        return "lora", True
    if model_pre is model_ft:
        return "same", False
    return "full", False


def low_memory_pass(model_ft: Model, model_pre: Model, device) -> Optional[str]:
    """The pass for a run whose UNets recompute their activations (``--low-memory``):
    ``None`` (the engine's own choice), or ``sequential`` where that choice would be
    ``stacked``, which runs under ``vmap`` and cannot recompute."""
    kind, _ = pair_kind(model_ft, model_pre)
    name, _ = choose(kind, torch.device(device), measured_here())
    return "sequential" if name == "stacked" else None


def measured_here() -> dict:
    """GPU measurements of the pair passes in this checkout's ``bench/results`` (an
    editable install), as ``measured_from_rows`` returns them; ``{}`` without any. CPU rows
    are left out: a CPU run keeps the default, whose results equal the reference's bit for
    bit, and CPU timings on a shared machine are too noisy to pick by."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench" / "results"
    rows = []
    for p in sorted(folder.glob("pairpass-*.json")):
        if p.name == "pairpass-cpu.json":
            continue
        try:
            lines = p.read_text().splitlines()
        except OSError:
            continue
        for line in lines:  # one JSON row per line (bench/common.py: append_row)
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return measured_from_rows([r for r in rows if isinstance(r, dict)])
