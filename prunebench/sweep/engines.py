"""Where a sweep's runs execute: one after another in this process, ``runs_per_gpu`` at a time
in worker processes (:mod:`prunebench.sweep.packing`), or one Ray task per run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunebench.config.run import RunConfig, Sharing, cfg_run_id
from prunebench.errors import ConfigError
from prunebench.sweep.execute import Outcome, prepare_baseline, run_one
from prunebench.sweep.spec import Sweep
from prunebench.training.precision import device_type

#: environment variables a Ray worker needs to see as the driver does
FORWARDED_ENV = ("PRUNEBENCH_CACHE", "PRUNEBENCH_DATA")


def _local_engine(sweep: Sweep, max_parallel: int | None, verbose: bool):
    from prunebench.sweep.packing import PackedEngine, plan_slots

    slots = plan_slots(sweep.runs_per_gpu, device_type(sweep.device), max_parallel)
    if slots.total == 1:
        return _LocalEngine(verbose)
    if slots.gpus and sweep.device not in ("auto", "cuda"):
        raise ConfigError(f"device {sweep.device!r}: with several GPUs the local executor gives each worker its own "
                          "GPU; set device to 'auto' or 'cuda'")
    return PackedEngine(slots, verbose)


class _LocalEngine:
    """Sequential, in this process."""

    sharing = Sharing(1, "local")

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def baselines(self, cfgs: Sequence[RunConfig]) -> list[str]:
        return [prepare_baseline(cfg) for cfg in cfgs]

    def runs(self, cfgs: Sequence[RunConfig], blocking: bool):
        for cfg in cfgs:
            yield run_one(cfg, blocking=blocking, verbose=self.verbose)

    def close(self) -> None:
        pass


def _ray_run(cfg: RunConfig, blocking: bool, verbose: bool, env: Mapping[str, str]) -> Outcome:
    os.environ.update(env)
    return run_one(cfg, blocking=blocking, verbose=verbose)


def _ray_baseline(cfg: RunConfig, env: Mapping[str, str]) -> str:
    os.environ.update(env)
    return prepare_baseline(cfg)


class _RayEngine:
    """One Ray task per run (``1 / runs_per_gpu`` of a GPU each where CUDA is available, else
    one CPU). Joins the cluster at ``address``, uses an already initialised Ray, or starts a
    local instance."""

    def __init__(self, address: str | None, max_parallel: int | None, verbose: bool, runs_per_gpu: int = 1) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray executor needs Ray: pip install 'prunebench[ray]'") from None
        import torch

        self.ray = ray
        self.verbose = verbose
        self.max_parallel = max_parallel
        self.env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.started = False
        if not ray.is_initialized():
            ray.init(address=address) if address else ray.init()
            self.started = True
        if torch.cuda.is_available():
            resources: dict[str, float] = {"num_gpus": 1 / runs_per_gpu}
            per_device = runs_per_gpu if max_parallel is None else min(runs_per_gpu, max_parallel)
        else:  # one CPU per task: as many runs share a node's cores as it has cores
            resources = {"num_cpus": 1}
            cores = max((int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
            per_device = cores if max_parallel is None else min(cores, max_parallel)
        self.sharing = Sharing(max(1, per_device), "ray")
        self.run_task = ray.remote(**resources)(_ray_run)
        self.baseline_task = ray.remote(**resources)(_ray_baseline)

    @staticmethod
    def _absolute(cfg: RunConfig) -> RunConfig:
        """Workers need not share the driver's working directory."""
        return dataclasses.replace(cfg, results_dir=Path(cfg.results_dir).absolute(),
                                   data_dir=Path(cfg.data_dir).absolute() if cfg.data_dir else None,
                                   baseline=cfg.baseline.absolute() if isinstance(cfg.baseline, Path) else cfg.baseline)

    def baselines(self, cfgs: Sequence[RunConfig]) -> list[str]:
        # distinct baselines never share a checkpoint, so they may train side by side
        out = []
        for ref in [self.baseline_task.remote(self._absolute(cfg), self.env) for cfg in cfgs]:
            try:
                out.append(self.ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - a lost worker; the runs will retry and fail
                out.append(f"failed: {type(exc).__name__}: {exc}")
        return out

    def runs(self, cfgs: Sequence[RunConfig], blocking: bool):
        queue = list(cfgs)
        in_flight: dict[Any, RunConfig] = {}
        while queue or in_flight:
            while queue and (self.max_parallel is None or len(in_flight) < self.max_parallel):
                cfg = queue.pop(0)
                in_flight[self.run_task.remote(self._absolute(cfg), blocking, self.verbose, self.env)] = cfg
            ready, _ = self.ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                cfg = in_flight.pop(ref)
                try:
                    yield self.ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died (e.g. out of memory)
                    yield Outcome(cfg_run_id(cfg), "failed", error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
