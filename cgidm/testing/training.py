"""Training the tiny models: the denoising loop every tiny world uses, and the progress it
prints on long stages (a bar on a terminal, a line every 30 s in a log or CI)."""
from __future__ import annotations

from typing import Optional

import torch

# In a log or CI a long stage prints a line at least this often (seconds).
LOG_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StageProgress:
    """Progress of one long stage of the build (``stage``, ``total`` steps). On a terminal
    a tqdm bar; in a log or CI (the stream is not a terminal), where a bar prints nothing
    or redraws with carriage returns, one plain line at the start, then at least every
    ``interval`` seconds while steps finish, and at the end: stage, step/total, rate, ETA
    and the last loss. It only watches: the training it reports on is unchanged."""

    def __init__(self, stage: str, total: int, *, interval: float = LOG_INTERVAL_S, stream=None,
                 tty: Optional[bool] = None, clock=None) -> None:
        import sys
        import time

        self.stage, self.total, self.interval = stage, int(total), float(interval)
        self.clock = clock or time.monotonic
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.done = 0
        self.loss: Optional[float] = None
        self.t0 = self.last = self.clock()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=stage, leave=False, file=self.stream)
        else:
            self._line(f"{self.stage}: 0/{self.total} steps")

    def _line(self, text: str) -> None:
        self.stream.write(f"tiny world: {text}\n")
        self.stream.flush()

    def status(self) -> str:
        elapsed = self.clock() - self.t0
        text = f"{self.stage}: {self.done}/{self.total} steps ({100 * self.done // max(self.total, 1)}%)"
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            text += f", {rate:.2f} steps/s, ETA {_duration((self.total - self.done) / rate)}"
        if self.loss is not None:
            text += f", loss {self.loss:.4f}"
        return text

    def update(self, n: int = 1, loss: Optional[float] = None) -> None:
        self.done += n
        if loss is not None:
            self.loss = loss
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.clock() - self.last >= self.interval:
            self.last = self.clock()
            self._line(self.status())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.total:
            took = _duration(self.clock() - self.t0)
            loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
            self._line(f"{self.stage}: done, {self.done}/{self.total} steps in {took}{loss}")


def train_unet(unet, cond: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor, steps: int,
               lr: float, batch: int, seed: int, params=None, desc: str = "train",
               on_step=None, progress=None, prediction_type: str = "epsilon") -> float:
    """Denoising training: ``cond [N, L, D]`` per image, ``x0 [N, C, H, W]``; the UNet
    regresses the noise (``prediction_type`` epsilon) or v = sqrt(abar) n - sqrt(1-abar) x0
    (v_prediction, docs/families.md);
    ``desc`` names the stage in its progress (``StageProgress``, or ``progress(desc, steps)``).
    ``on_step(step)`` runs after each step (1-based), e.g. to save a checkpoint of one run at
    several strengths; it does not touch the draws."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in (params or unet.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.1)
    unet.train()
    last = float("nan")
    bar = (progress or StageProgress)(desc, steps)
    for step in range(1, steps + 1):
        idx = torch.randint(0, x0.shape[0], (min(batch, x0.shape[0]),), generator=g)
        t = torch.randint(0, abar.shape[0], (idx.shape[0],), generator=g)
        noise = torch.randn(x0[idx].shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0[idx] + (1 - a).sqrt() * noise
        pred = unet(x_t, t, encoder_hidden_states=cond[idx]).sample
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0[idx]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = loss.item()
        bar.update(1, loss=last)
        if on_step is not None:
            on_step(step)
    bar.close()
    unet.eval()
    return last
