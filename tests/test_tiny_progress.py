"""Progress of the tiny world's long stages (cgidm/testing/tiny.py): in a log or CI a plain
line at least every 30 s with the stage, step/total and ETA; a bar on a terminal."""
import io

import torch

from cgidm.testing import tiny
from cgidm.testing.tiny import StageProgress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_at_least_every_interval_with_eta():
    out, clock = io.StringIO(), Clock()
    bar = StageProgress("pretrain (stage 1/3)", 100, interval=30, stream=out, tty=False, clock=clock)
    for i in range(100):
        clock.now += 1.0  # one step per second
        bar.update(1, loss=1.0 / (i + 1))
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "tiny world: pretrain (stage 1/3): 0/100 steps"
    # after 30, 60 and 90 s: step/total, rate and the time left at that rate
    assert lines[1] == "tiny world: pretrain (stage 1/3): 30/100 steps (30%), 1.00 steps/s, ETA 1m10s, loss 0.0333"
    assert lines[2].startswith("tiny world: pretrain (stage 1/3): 60/100 steps (60%)") and "ETA 40s" in lines[2]
    assert "90/100 steps" in lines[3] and "ETA 10s" in lines[3]
    assert lines[4] == "tiny world: pretrain (stage 1/3): done, 100/100 steps in 1m40s, loss 0.0100"
    assert len(lines) == 5


def test_slow_steps_print_every_step_and_fast_ones_stay_quiet():
    out, clock = io.StringIO(), Clock()
    bar = StageProgress("lora", 3, interval=30, stream=out, tty=False, clock=clock)
    for _ in range(3):
        clock.now += 45.0
        bar.update()
    assert [ln.split(": ", 2)[-1][:9] for ln in out.getvalue().splitlines()] == ["0/3 steps", "1/3 steps",
                                                                                "2/3 steps", "3/3 steps"]
    out2 = io.StringIO()
    fast = StageProgress("lora", 1000, interval=30, stream=out2, tty=False, clock=Clock())
    for _ in range(1000):
        fast.update()
    assert len(out2.getvalue().splitlines()) == 1


def test_a_terminal_gets_a_bar_not_lines():
    out = io.StringIO()
    bar = StageProgress("finetune", 5, stream=out, tty=True)
    for _ in range(5):
        bar.update(1, loss=0.5)
    bar.close()
    assert "tiny world:" not in out.getvalue() and "finetune" in out.getvalue()


def test_train_unet_reports_its_stage_and_trains_as_before(capsys):
    from diffusers import UNet2DConditionModel

    def run():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**tiny.tiny_unet_config(8))
        g = torch.Generator().manual_seed(1)
        x0, cond = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 32, generator=g)
        abar = torch.linspace(0.999, 0.01, 1000)
        loss = tiny.train_unet(unet, cond, x0, abar, 3, 1e-3, 2, seed=5, desc="finetune (stage 2/3)")
        return loss, torch.cat([p.detach().flatten() for p in unet.parameters()])

    loss, weights = run()
    err = capsys.readouterr().err  # pytest's stderr is not a terminal: the log form
    assert "tiny world: finetune (stage 2/3): 0/3 steps" in err
    assert "tiny world: finetune (stage 2/3): done, 3/3 steps in" in err
    # progress only watches: the same seed trains the same weights
    loss2, weights2 = run()
    assert loss == loss2 and torch.equal(weights, weights2)
    assert tiny.WORLD_VERSION == 3  # a cached world stays valid


def test_bars_in_a_log_file_are_lines_of_their_own():
    """In a log file (not a terminal) every bar refresh is one line ending in a newline:
    no carriage returns or cursor moves, which ``tail -f`` and log collectors show as
    nothing until the run ends; a line repeated as it is written again is written once."""
    import io

    from tqdm.auto import tqdm

    from cgidm.progress import _LogLines

    out = io.StringIO()
    bar = tqdm(total=3, desc="images", file=_LogLines(out), mininterval=0, position=1)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("images:   0%") and lines[-1].startswith("images: 100%")
    assert [f"{k}/3" in line for k, line in zip(range(4), lines)] == [True] * 4 and len(set(lines)) == len(lines)


def test_the_line_counter_reads_only_what_was_appended(tmp_path):
    """The total bar's shard counts: lines as the file grows (a row half-written counts
    once its newline is there), a file not there yet as 0, one rewritten shorter from
    its start; the bytes read are only those appended since the last count."""
    from cgidm.progress import LineCounter

    path = tmp_path / "rank-0.jsonl"
    lines = LineCounter()
    assert lines.count(path) == 0
    path.write_bytes(b'{"id": 1}\n{"id"')
    assert lines.count(path) == 1
    with path.open("ab") as f:
        f.write(b': 2}\n' + b'{"id": 3}\n' * 3)
    assert lines.count(path) == 5 == LineCounter().count(path)  # the same count read from the start
    assert lines.seen[path] == (path.stat().st_size, 5)
    path.write_bytes(b"x\n")
    assert lines.count(path) == 1


def test_the_total_bar_counts_the_rows_added_after_its_start_reading_each_byte_once(tmp_path, monkeypatch):
    """Rank 0's total bar under torchrun: the shards' lines counted when screen starts are
    the base; the bar shows the images done before plus the lines added since, and the
    counter that took the base reads only what was appended after it."""
    from cgidm import progress as P
    from cgidm.resume import SHARDS

    shards = tmp_path / SHARDS
    shards.mkdir()
    for r in range(2):
        (shards / f"rank-{r}.jsonl").write_text('{"id": "old"}\n' * 3)
    lines = P.LineCounter()
    for p in shards.glob("rank-*.jsonl"):
        lines.count(p)
    read = []
    real_open = open

    def spy(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "rank-" in str(path):
            real_seek = f.seek
            f.seek = lambda off, *w: (read.append(off), real_seek(off, *w))[1]
        return f

    monkeypatch.setattr(P, "open", spy, raising=False)
    bars = P.Progress(tmp_path, 4, 10, 6, 0, 2, True, lines)
    for r in range(2):
        with (shards / f"rank-{r}.jsonl").open("a") as f:
            f.write('{"id": "new"}\n' * (r + 1))
    bars.close()
    assert bars.total_bar.n == 6 + 3
    assert read and min(read) == len('{"id": "old"}\n') * 3  # never from the start again


def test_the_first_batch_s_steps_say_how_long_the_run_takes(monkeypatch):
    """One line, from the first batch's steps after the first (its warm-up), once 30 s of them
    have passed or at the batch's end; later batches get no callback (no device sync)."""
    import cgidm.progress as progress

    clock, said = Clock(), []
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    factory = progress.first_steps_estimate(1000, 10, 3, 4, said.append)
    failed = factory(4)  # a first try that fails (out of memory) before it says anything: timed again
    failed(0, 0.1)
    cb = factory(4)
    clock.now += 50.0  # the first step: compile, warm-up
    cb(0, 0.1)
    for step in range(1, 16):
        clock.now += 2.0
        cb(step, 0.1)
    # 15 steps of 2 s after the first (30 s): 2 s a step, 2000 s a batch, 3 batches of up to 4
    assert said == ["estimate: the PGD search takes 2 s a step for 4 images (timed over steps 2 to 16 of 1000): "
                    "about 33 min a batch of up to 4, 1.7 h for 10 images"]
    for step in range(16, 1000):
        cb(step, 0.1)
    for step in range(1000):  # the batch's next chunk: said once
        cb(step, 0.1)
    assert len(said) == 1 and factory(4) is None
    short = progress.first_steps_estimate(3, 1, 1, 1, said.append)()  # a batch shorter than 30 s: at its end
    for step in range(3):
        clock.now += 1.0
        short(step, 0.0)
    assert said[-1] == ("estimate: the PGD search takes 1 s a step for 1 image (timed over steps 2 to 3 of 3): about "
                        "3 s a batch of up to 1, 3 s for 1 image")
    # the reference engine pads nothing: a first batch of 1 image times one image's share; and with baselines the
    # figure is said to leave them out
    one = progress.first_steps_estimate(100, 17, 2, 16, said.append, padded=False, baselines=True)(1)
    for step in range(100):
        clock.now += 0.5
        one(step, 0.0)
    assert said[-1] == ("estimate: the PGD search takes 0.5 s a step for 1 image (timed over steps 2 to 61 of 100): "
                        "about 13 min a batch of up to 16, 14 min for 17 images, besides the baselines")


def test_authenticate_on_a_cpu_says_the_estimate_in_a_log(tiny_world, tmp_path, capsys):
    """In a log file (no PGD bar) the estimate is the one line before the first batch ends."""
    from cgidm import cli

    imgs = tiny_world / "images"
    assert cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--images", str(imgs / "members"), "--out", str(tmp_path / "o"), "--preset", "demo",
                     "--steps", "5", "--batch-size", "4", "--device", "cpu"]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert err.count("estimate: the PGD search takes ") == 1 and "(timed over steps 2 to 5 of 5): about " in err, err
    assert "a batch of up to 4, " in err and " for 6 images" in err
