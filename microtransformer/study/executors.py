"""Where the study's runs execute.

- `SubprocessExecutor` (the default): one run at a time, each in a fresh Python process on this
  machine, pulled from the plan only when the previous one has finished, so the study loop can
  stop at its time budget and size equal-time runs from the speeds measured so far.
- `SubmititExecutor`: every run handed at once to a job scheduler through submitit: Slurm on a
  cluster (`cluster="slurm"`), or submitit's own local executor (`cluster="local"`: processes on
  this machine, which is how it is tested here). Results are gathered as jobs finish, into the
  same RUN/result.json files and so the same report. The job ids are kept in
  REPORT_DIR/jobs.json: a study killed while its jobs run re-attaches to the Slurm jobs that are
  still queued or running when it is rerun, instead of submitting them again.

A run's record is made by the same function either way (`worker.execute_run`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from microtransformer.errors import UserError
from microtransformer.fileio import atomic_write_json
from microtransformer.study.plan import RunSpec
from microtransformer.study.worker import execute_run, run_in_subprocess

Outcome = dict[str, Any] | Exception  # a run's result record, or why it failed
CLUSTERS = ("local", "slurm", "debug")
LEDGER = "jobs.json"
WAITING_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


class Executor(Protocol):
    """Runs specs and yields (spec, outcome) as each finishes, in any order."""

    name: str

    def run(self, specs: Iterable[RunSpec], data_dirs: dict[str, Path], out_dir: Path
            ) -> Iterator[tuple[RunSpec, Outcome]]:
        """Run every spec pulled from `specs` (RUN_DIR = out_dir/runs/<run_id>)."""
        ...


class SubprocessExecutor:
    """One run at a time in a fresh local Python process (see `worker.run_in_subprocess`)."""

    name = "subprocess"

    def run(self, specs: Iterable[RunSpec], data_dirs: dict[str, Path], out_dir: Path
            ) -> Iterator[tuple[RunSpec, Outcome]]:
        for spec in specs:  # pulled lazily: the caller decides the next one after this one
            try:
                yield spec, run_in_subprocess(spec, data_dirs[spec.corpus],
                                              out_dir / "runs" / spec.run_id)
            except RuntimeError as exc:
                yield spec, exc


def submitted_run(spec: RunSpec, data_dir: str, run_dir: str) -> dict[str, Any]:
    """The function a scheduler's job runs: one study run, its record returned (and written)."""
    return execute_run(spec, Path(data_dir), Path(run_dir))


@dataclass
class SubmititExecutor:
    """Every run as a job of a submitit executor: `cluster` "slurm", "local" or "debug" (in
    this process, for debugging). `timeout_min` bounds each job; `slurm` holds extra
    `slurm_*` parameters (partition, account, gres...) passed to submitit unchanged."""

    cluster: str = "slurm"
    timeout_min: int = 240
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    max_parallel: int = 16
    slurm: dict[str, Any] = field(default_factory=dict)
    name: str = field(default="submitit", init=False)

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise UserError(f"--cluster {self.cluster!r} is not one of {', '.join(CLUSTERS)}")
        for key, value, low in (("--timeout-min", self.timeout_min, 1),
                                ("--cpus-per-task", self.cpus_per_task, 1),
                                ("--gpus-per-node", self.gpus_per_node, 0),
                                ("--max-parallel", self.max_parallel, 1)):
            if value < low:
                raise UserError(f"{key} {value} must be >= {low}")

    def executor(self, folder: Path) -> Any:
        """The submitit executor, its logs under `folder`."""
        try:
            import submitit  # optional: only a study sent to a scheduler needs it
        except ImportError:
            raise UserError("--executor submitit needs the submitit package: pip install "
                            "'micro-transformer[cluster]' (or pip install submitit)") from None
        ex = submitit.AutoExecutor(folder=str(folder), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.timeout_min,
                                  "cpus_per_task": self.cpus_per_task,
                                  "name": "microtransformer-study"}
        if self.cluster == "slurm":
            params.update(gpus_per_node=self.gpus_per_node,
                          slurm_array_parallelism=self.max_parallel,
                          **{k if k.startswith("slurm_") else f"slurm_{k}": v
                             for k, v in self.slurm.items()})
        ex.update_parameters(**params)
        return ex

    def run(self, specs: Iterable[RunSpec], data_dirs: dict[str, Path], out_dir: Path
            ) -> Iterator[tuple[RunSpec, Outcome]]:
        folder = out_dir / "submitit"
        ex = self.executor(folder)
        ledger_path = out_dir / LEDGER
        ledger = _read_ledger(ledger_path)
        jobs = []
        for spec in specs:  # all at once: the scheduler decides the order
            run_dir = out_dir / "runs" / spec.run_id
            job = self._reattach(ledger.get(spec.run_id), folder)
            if job is None:
                run_dir.mkdir(parents=True, exist_ok=True)
                job = ex.submit(submitted_run, spec, str(data_dirs[spec.corpus]), str(run_dir))
                ledger[spec.run_id] = {"job_id": str(job.job_id), "cluster": self.cluster}
                atomic_write_json(ledger_path, ledger)
            jobs.append((spec, job))
        pending = list(jobs)
        while pending:
            for item in [j for j in pending if j[1].done()]:
                pending.remove(item)
                spec, job = item
                try:
                    yield spec, job.result()
                except Exception as exc:  # the job's own exception, or the scheduler's
                    yield spec, RuntimeError(f"run {spec.run_id} failed in job {job.job_id}: "
                                             f"{str(exc)[-400:]}")
            if pending:
                time.sleep(1.0)

    def _reattach(self, entry: dict[str, Any] | None, folder: Path) -> Any:
        """The Slurm job of an earlier invocation if it is still queued or running."""
        if not entry or entry.get("cluster") != "slurm" or self.cluster != "slurm":
            return None  # a local job died with the study that started it
        import submitit

        job = submitit.SlurmJob(folder=str(folder), job_id=entry["job_id"])
        return job if job.state in WAITING_STATES else None


def _read_ledger(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}  # torn: resubmit what is unfinished


def make_executor(name: str, **options: Any) -> Executor:
    """The executor named on the command line ("subprocess" or "submitit")."""
    if name == "subprocess":
        return SubprocessExecutor()
    if name == "submitit":
        return SubmititExecutor(**options)
    raise UserError(f"--executor {name!r} is not one of subprocess, submitit")
