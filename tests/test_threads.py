"""CPU threads chosen by measurement (prunebench.training.threads), fixed by --threads or PRUNEBENCH_THREADS."""

from __future__ import annotations

import pytest
import torch

from prunebench.errors import ConfigError
from prunebench.training import threads


class FakeClock:
    """A clock that a step advances by the time it would take at the current thread count."""

    def __init__(self, seconds_at: dict[int, float]):
        self.now = 0.0
        self.seconds_at = seconds_at

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += self.seconds_at[torch.get_num_threads()]


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV, raising=False)
    threads.history.clear()
    yield
    torch.set_num_threads(before)
    threads.history.clear()


def test_the_fastest_count_is_kept():
    clock = FakeClock({1: 0.5, 2: 0.9, 3: 0.7})  # two threads fight a busy core: slower than one
    n, per_step = threads.choose(clock.step, [1, 2, 3], clock=clock)
    assert (n, per_step) == (1, 0.5) and torch.get_num_threads() == 1
    clock = FakeClock({1: 0.5, 2: 0.3})
    assert threads.choose(clock.step, [1, 2], clock=clock) == (2, pytest.approx(0.3))


def test_a_stage_measures_again_when_its_rate_halves(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads, "others_running", lambda: 0)  # the fake clock stands for the load
    clock = FakeClock({1: 1.0, 2: 0.5})
    stage = threads.StageThreads("baseline", total=500, batch=100, make_step=lambda: clock.step, clock=clock)
    assert stage.entry == {"stage": "baseline", "threads": 2, "img_per_s": 200.0, "how": "measured"}
    assert threads.history == [stage.entry]
    # the stage runs at the measured rate: no new measurement
    for step in range(1, 51):
        clock.now += 0.5
        stage.after(step)
    assert stage.entry["how"] == "measured"
    # another run starts: two threads now take 2 s a step, one thread 1.2 s
    clock.seconds_at = {1: 1.2, 2: 2.0}
    for step in range(51, 76):
        clock.now += 2.0
        stage.after(step)
    assert stage.entry["threads"] == 1 and stage.entry["how"].startswith("measured again at step 75")
    assert torch.get_num_threads() == 1


def test_short_stages_and_fixed_counts_measure_nothing(monkeypatch):
    def never():
        raise AssertionError("measured")

    threads.StageThreads("finetune", total=threads.MIN_STEPS - 1, batch=8, make_step=never)
    monkeypatch.setenv(threads.ENV, "1")
    threads.StageThreads("baseline", total=10_000, batch=8, make_step=never)
    assert [e["how"] for e in threads.history] == ["kept (short stage)", "fixed"]
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", "", " "])
def test_bad_thread_counts_are_refused(value):
    with pytest.raises(ConfigError, match="must be a whole number of threads of at least 1"):
        threads.check_threads(value)
    assert threads.check_threads(" 3 ") == 3


def test_threads_0_is_a_one_line_error_before_any_work(tmp_path):
    from reliability._support import one_line_error, prunebench

    proc = prunebench("run", "-c", "l1", "-a", "resnet20", "--threads", "0", "--results-dir", tmp_path / "r")
    assert one_line_error(proc) == "error: --threads must be a whole number of threads of at least 1, got '0'"
    assert not (tmp_path / "r").exists()
    proc = prunebench("run", "-c", "l1", "-a", "resnet20", "--results-dir", tmp_path / "r",
                      env={threads.ENV: "two"})
    assert one_line_error(proc) == "error: PRUNEBENCH_THREADS must be a whole number of threads of at least 1, got 'two'"


def test_the_record_says_what_each_stage_used(tmp_path, monkeypatch):
    from reliability._support import TINY_SETS, invoke, records

    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    res = invoke("run", "-c", "l1", "-a", "resnet20", "-d", "digits", "--budget", "smoke", *TINY_SETS,
                 "--set=baseline_epochs=13", "--threads", "1", "--results-dir", tmp_path / "r", "-q")
    assert res.exit_code == 0, res.output
    (rec,) = records(tmp_path / "r").values()
    assert rec["threads"] == [{"stage": "baseline", "threads": 1, "how": "fixed"},
                              {"stage": "finetune", "threads": 1, "how": "fixed"}]
    assert "threads" not in rec["identity"]


def test_a_process_without_a_fixed_count_measures_its_starting_count(monkeypatch):
    seen = []
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads, "choose", lambda step, candidates=None: seen.append(step) or (1, 0.01))
    threads.apply_fixed()
    assert len(seen) == 1
    seen[0]()  # the probe kernel runs
    monkeypatch.setenv(threads.ENV, "2")
    threads.apply_fixed()
    assert len(seen) == 1 and torch.get_num_threads() == 2


def test_cores_that_others_run_on_are_not_candidates(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 4)
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    assert threads.thread_counts() == [1, 2, 3, 4]
    monkeypatch.setattr(threads, "others_running", lambda: 1)  # another run is computing now
    assert threads.thread_counts() == [1, 2, 3]
    monkeypatch.setattr(threads, "others_running", lambda: 9)
    assert threads.thread_counts() == [1]


def test_others_running_reads_the_kernel_s_count():
    n = threads.others_running()
    assert isinstance(n, int) and n >= 0 and threads.runnable() >= 1


def test_others_running_leaves_out_this_process_s_threads_and_short_lived_ones(monkeypatch):
    counts = iter([5, 2, 4, 3, 6])
    monkeypatch.setattr(threads, "runnable", lambda: next(counts))
    monkeypatch.setattr(threads, "own_running", lambda: 2)  # say, the caller and a spinning OpenMP thread
    assert threads.others_running(samples=5, interval=0) == 0  # the least of 3, 0, 2, 1, 4
    monkeypatch.setattr(threads, "runnable", lambda: None)
    assert threads.others_running(interval=0) == 0


def test_own_running_counts_a_thread_of_this_process_that_computes():
    import threading

    stop = threading.Event()

    def compute():  # matmuls release the GIL: this thread is running, not waiting
        a = torch.randn(256, 256)
        while not stop.is_set():
            a @ a

    torch.set_num_threads(1)
    worker = threading.Thread(target=compute)
    worker.start()
    try:
        seen = max(threads.own_running() for _ in range(50))
    finally:
        stop.set()
        worker.join()
    assert seen >= 2



def _count_sensitive(clock: FakeClock, same_up_to: int):
    """An evaluation whose logits move at thread counts above ``same_up_to`` (a kernel that
    splits a sum across threads there), on a clock that more threads make faster."""
    head = torch.arange(8.0)[:, None]

    def forward(x):
        clock.step()
        n = torch.get_num_threads()
        return x + (0.0 if n <= same_up_to else 1e-7 * n)

    return forward, head


def _eval_set_up(monkeypatch, cpus=3):
    monkeypatch.setattr(threads, "cpus", lambda: cpus)
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    torch.set_num_threads(1)
    return FakeClock({1: 0.9, 2: 0.5, 3: 0.3})


def test_an_evaluation_takes_the_fastest_count_that_computes_the_same_logits(monkeypatch):
    clock = _eval_set_up(monkeypatch)
    forward, head = _count_sensitive(clock, same_up_to=2)  # 3 threads would be faster but move the logits
    assert threads.evaluation_plan(forward, head, head.clone(), 2, images=10_000, clock=clock) == \
        threads.EvaluationPlan(2)
    assert torch.get_num_threads() == 2
    # 4 batches of 2 at each count; the first warms up, the other 3 (6 images) take 3 x 0.5 s at 2 threads
    assert threads.history == [{"stage": "evaluation", "threads": 2, "how": "measured (same logits as at 1)",
                                "img_per_s": 4.0}]


def test_an_evaluation_whose_logits_differ_at_every_count_keeps_the_current_one(monkeypatch):
    clock = _eval_set_up(monkeypatch)
    forward, head = _count_sensitive(clock, same_up_to=2)
    assert threads.evaluation_plan(forward, head, head + 1.0, 2, images=10_000, clock=clock) is None
    assert torch.get_num_threads() == 1
    assert threads.history[0]["how"].startswith("kept (no other evaluation gives the same logits")


@pytest.mark.parametrize("why", ["fixed", "small", "one cpu"])
def test_fixed_counts_small_evaluations_and_one_cpu_try_the_current_count_only(monkeypatch, why):
    clock = _eval_set_up(monkeypatch, cpus=1 if why == "one cpu" else 3)
    if why == "fixed":
        monkeypatch.setenv(threads.ENV, "1")
    forward, head = _count_sensitive(clock, same_up_to=3)
    images = threads.MIN_EVAL_IMAGES - 1 if why == "small" else 10_000
    assert threads.evaluation_plan(forward, head, head.clone(), 2, images=images, clock=clock) == \
        threads.EvaluationPlan(1)
    assert clock.now == pytest.approx(3.6) and threads.history == []  # the first images once, at 1 thread


def test_evaluate_gives_the_plain_loop_s_accuracy_and_leaves_the_thread_count_as_it_was(monkeypatch):
    """A CIFAR-sized evaluation through ``evaluate`` (which checks and may choose batches of 128
    and another count) counts exactly what the plain 512-image loop at one thread counts."""
    from prunebench import registry
    from prunebench.pipeline.data import evaluate
    from prunebench.pipeline.metrics import accuracy
    from prunebench.training.engine import DeviceData

    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    torch.manual_seed(0)
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (threads.MIN_EVAL_IMAGES, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (threads.MIN_EVAL_IMAGES,), generator=g)
    data = DeviceData(train_x=x, train_y=y, test_x=x, test_y=y, mean=torch.zeros(1, 1, 1, 1),
                      std=torch.ones(1, 1, 1, 1), hflip=False)
    torch.set_num_threads(1)
    plain = accuracy(model, data.normalise(x), y, batch_size=512)[1]
    assert evaluate(model, data, 10) == {"top1": round(plain, 4)}
    assert torch.get_num_threads() == 1 and not model.training
    assert [h["stage"] for h in threads.history] == ["evaluation"]


def _sleepy(offset_in_workers: float = 0.0):
    """A forward that waits 40 ms per batch at any thread count (as intra-op threads that do not
    help), and, with ``offset_in_workers``, returns other numbers when run off the main thread."""
    import threading
    import time

    def forward(x):
        time.sleep(0.04)
        moved = threading.current_thread() is not threading.main_thread()
        return x + (offset_in_workers if moved else 0.0)

    return forward


def test_an_evaluation_shares_its_batches_among_workers_where_threads_do_not_help(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    torch.set_num_threads(2)
    head = torch.arange(8.0)[:, None]  # 4 batches of 2: one count times 3 x 40 ms, two workers 2 x 40 ms
    assert threads.evaluation_plan(_sleepy(), head, head.clone(), 2, images=10_000) == \
        threads.EvaluationPlan(1, workers=2)
    assert torch.get_num_threads() == 1
    (entry,) = threads.history
    assert entry["threads"] == 1 and entry["workers"] == 2 and entry["how"] == "measured (same logits as at 2)"
    assert 60 < entry["img_per_s"] <= 100  # 8 images in two rounds of 40 ms (one count: 6 in 3 x 40 ms)


def test_workers_whose_logits_differ_are_not_taken(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    head = torch.arange(8.0)[:, None]
    plan = threads.evaluation_plan(_sleepy(offset_in_workers=1e-7), head, head.clone(), 2, images=10_000)
    assert plan is not None and plan.workers == 1 and "workers" not in threads.history[0]


def test_no_workers_with_a_fixed_count_or_one_free_core(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    head = torch.arange(8.0)[:, None]
    monkeypatch.setattr(threads, "others_running", lambda: 1)  # another run computes on the other core
    assert threads.evaluation_plan(_sleepy(), head, head.clone(), 2, images=10_000) == threads.EvaluationPlan(1)
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    monkeypatch.setenv(threads.ENV, "2")
    torch.set_num_threads(2)
    assert threads.evaluation_plan(_sleepy(), head, head.clone(), 2, images=10_000) == threads.EvaluationPlan(2)


def test_in_workers_keeps_the_order_and_the_callers_grad_mode():
    import threading

    def where(i):
        return i, torch.is_grad_enabled(), threading.current_thread() is threading.main_thread()

    with torch.no_grad():
        out = threads.in_workers(where, range(6), 3)
    assert [o[0] for o in out] == list(range(6)) and not any(o[1] for o in out) and not any(o[2] for o in out)
    assert threads.in_workers(where, range(3), 1) == [(0, True, True), (1, True, True), (2, True, True)]


def test_accuracy_in_workers_counts_what_one_thread_counts():
    from prunebench import registry
    from prunebench.pipeline.metrics import accuracy

    torch.manual_seed(0)
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    torch.set_num_threads(1)
    one = accuracy(model, x, y, batch_size=64, topk=(1, 5))
    assert accuracy(model, x, y, batch_size=64, topk=(1, 5), workers=3) == one
    counted = accuracy(model, x[:100], y[:100], batch_size=64, topk=(1, 5))
    hits = {k: round(v * 100 / 100) for k, v in counted.items()}  # percent of 100 images = hits
    assert accuracy(model, x, y, batch_size=64, topk=(1, 5), start=100, counted=hits, workers=2) == one
