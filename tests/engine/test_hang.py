"""A hang is a report: 2 gloo ranks under torchrun, with a fault injected by tests/engine/faults (one rank skips an
all-reduce, makes one extra module call, or SIGKILLs itself), end within seconds with ``RUN/hang/report.txt`` naming
the rank (the deepspeed launcher's runs: test_hostfile_ssh.py, test_failure_exit.py); one process that blocks is
stopped by its watchdog with its stack on disk; the report's rules on hand-made rank files.
"""
import multiprocessing as mp
import re
import time
from pathlib import Path

import pytest

from mplug_ds.runtime import watchdog
from mplug_ds.runtime.hang_report import CallRecord, RankDump, Segment, build_report, rank_file
from mplug_ds.runtime.launch_env import WorldInfo
from mplug_ds.runtime.watchdog import EXIT_HANG
from tests.engine.engine_runs import run_until_all_exit, torchrun_command
from tests.processes import timeout

HANG_TIMEOUT = timeout(3)  # run.hang_timeout_s in these runs: a few steps' time
LIMIT = 25.0  # seconds from the last good step to the last exit: the time-out, the report's grace, teardown


def hang_args(*extra):
    return ["--config", "synthetic_tiny", "schedule.total_steps=8", "eval.retrieval=false",
            "logging.progress_bar=false", "logging.every_steps=1", "checkpoint.save_final=false",
            f"run.hang_timeout_s={HANG_TIMEOUT:g}", *extra]


def headline(out):
    return (out / "hang" / "report.txt").read_text().split("What happened: ", 1)[1].splitlines()[0]


@pytest.mark.slow
def test_a_rank_that_skips_an_all_reduce_is_named_with_the_step_and_the_collective(tmp_path):
    out = tmp_path / "run"
    ended = run_until_all_exit(torchrun_command(out, hang_args()), LIMIT, mark="step 2/8",
                               fault="skip_allreduce:1:3")
    assert ended.code != 0 and "step 3/8" not in ended.output
    assert ended.output.count("stopping: ") == 2 and "stopping: no progress for" in ended.output, ended.output[-4000:]
    assert f"rank 0: hang report: {out}/hang/report.txt" in ended.output
    line = headline(out)
    assert re.match(r"rank 1 skipped collective #\d+ of step 3: all_reduce 4 B at mplug_ds/engine/trainer\.py:\d+ "
                    r"in _any_rank \(entered by rank 0\)", line), line
    for rank, waits_in, batches in ((0, "_any_rank", 2), (1, "all_gather", 3)):
        text = rank_file(out / "hang", rank).read_text()
        assert "in collective #" in text and waits_in in text.split("where: ", 1)[1].splitlines()[0]
        assert "in optimizer_step" in text.split("stacks of the other threads", 1)[1]  # the training thread
        assert f'"next_index": {batches}' in text  # data position: rank 1 fetched step 3's batch, rank 0 did not


@pytest.mark.slow
def test_divergence_check_stops_a_rank_with_one_extra_module_call_at_the_next_check(tmp_path):
    """The watchdog keeps its automatic deadline here (run.hang_timeout_s=0)."""
    out = tmp_path / "run"
    args = hang_args("run.check_collectives=true", "run.check_every_steps=2", "run.hang_timeout_s=0")  # automatic
    ended = run_until_all_exit(torchrun_command(out, args), LIMIT, mark="step 3/8", fault="extra_call:1:3")
    assert ended.code != 0
    module = re.search(r"fault: rank 1 calls (\S+) once more in step 3", ended.output).group(1)
    assert "step 4/8" in ended.output and "step 5/8" not in ended.output  # the check after step 4 stopped it
    message = re.search(r"CollectiveDivergence: (rank 1 differs from rank 0 .*)", ended.output).group(1)
    assert f"rank 1 has module call {module} (step 3)" in message and "checked after step 4" in message
    assert ended.output.count(f"rank 1 has module call {module} (step 3)") >= 4  # both ranks raise and say so
    assert headline(out).startswith("every rank failed") and module in headline(out)


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_named_missing(tmp_path):
    out = tmp_path / "run"
    ended = run_until_all_exit(torchrun_command(out, hang_args()), LIMIT, mark="step 2/8", fault="sigkill:1:3")
    assert ended.code != 0
    assert re.match(r"rank 1 wrote no report within \d+ s: gone \(killed, crashed\) or frozen; the other ranks "
                    r"stopped when their collective #\d+ ", headline(out)), headline(out)
    assert "(step 3" in headline(out)
    assert rank_file(out / "hang", 0).exists() and not rank_file(out / "hang", 1).exists()


def _blocked_process(run_dir):
    dog = watchdog.HangWatchdog(Path(run_dir), WorldInfo(0, 0, 1), timeout_s=1.0, long_timeout_s=60.0,
                                data_position=lambda: {"next_index": 7}).start()
    for step in (1, 2, 3):
        watchdog.phase("train", step)
        watchdog.beat(micro_batch="1/1")

    def wait_for_a_peer_that_never_comes():
        time.sleep(120)

    wait_for_a_peer_that_never_comes()
    dog.stop()


def test_a_process_without_progress_writes_its_stack_and_exits(tmp_path):
    (tmp_path / "hang").mkdir()
    (tmp_path / "hang" / "report.txt").write_text("an earlier run's report")
    proc = mp.get_context("fork").Process(target=_blocked_process, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout(30))
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == EXIT_HANG
    text = rank_file(tmp_path / "hang", 0).read_text()
    assert "why: no progress for more than 1 s (run.hang_timeout_s)" in text
    assert "where: step 3, micro_batch 1/1: not in a collective" in text
    assert "in wait_for_a_peer_that_never_comes" in text and '"next_index": 7' in text
    assert "step 3" in (tmp_path / "hang" / "report.txt").read_text()
    [earlier] = [p for p in tmp_path.iterdir() if p.name.startswith("hang-")]  # moved aside, not overwritten
    assert (earlier / "report.txt").read_text() == "an earlier run's report"


# ---------------------------------------------------------------------------------------------- merging the files
A, B, C = "mplug_ds/engine/trainer.py:10 in _any_rank", "mplug_ds/distributed.py:20 in all_gather", "x.py:3 in f"
STEP_2 = [("all_reduce", 4, A), ("all_gather", 1024, B), ("all_reduce", 56, C)]  # collectives #1-#3


def dump(rank, step_3, world_size=3, in_flight=True):
    """Rank ``rank`` after step 2 (#1-#3) and ``step_3`` (from #4), stuck in its last collective."""
    calls = [CallRecord(i, kind, size, size, "other", site, "step 2", 0.001)
             for i, (kind, size, site) in enumerate(STEP_2, start=1)]
    calls += [CallRecord(i, kind, size, size, "other", site, "step 3", 0.001)
              for i, (kind, size, site) in enumerate(step_3, start=4)]
    if in_flight and step_3:
        calls[-1].in_flight = True
    return RankDump(session="s", rank=rank, world_size=world_size, host="node", pid=1, time=0.0, cause="hang",
                    reason="no progress for 3.0 s", position="step 3", idle_s=3.0, issued=len(calls),
                    in_flight=[calls[-1]] if in_flight and step_3 else [], recent=calls,
                    segments=[Segment("step 2", "train", 0, 11), Segment("step 3", "train", 3, 22)])


def test_report_names_the_rank_that_skipped_an_extra_or_missing_collective_or_is_behind():
    skipped = {0: dump(0, STEP_2[:1]), 1: dump(1, STEP_2[:1]), 2: dump(2, STEP_2[1:2])}
    assert headline_of(skipped, 3) == (f"rank 2 skipped collective #4 of step 3: all_reduce 4 B at {A} (entered by "
                                       f"ranks 0-1); its #4 is all_gather 1024 B at {B}")
    two = {0: dump(0, STEP_2[:1], 2), 1: dump(1, STEP_2[1:2], 2)}  # a tie: rank 1 stops repeating step 2
    assert headline_of(two, 2).startswith("rank 1 skipped collective #4 of step 3: all_reduce 4 B")
    extra = {0: dump(0, STEP_2[:2]), 1: dump(1, STEP_2[:2]), 2: dump(2, [("broadcast", 8, C), *STEP_2[:1]])}
    assert headline_of(extra, 3) == (f"rank 2 entered an extra collective #4 in step 3: broadcast 8 B at {C} "
                                     f"(ranks 0-1 entered all_reduce 4 B at {A} there)")
    missing = {0: dump(0, STEP_2[:1]), 1: dump(1, STEP_2[:1])}
    assert headline_of(missing, 3).startswith("rank 2 wrote no report within 5 s: gone (killed, crashed) or "
                                              "frozen; the other ranks stopped in collective #4 all_reduce 4 B")
    behind = {0: dump(0, STEP_2[:1], 2), 1: dump(1, [], 2, in_flight=False)}
    assert headline_of(behind, 2) == ("rank 1 behind: entered 3 collectives while the others reached #4; step 3: "
                                      "not in a collective")


def headline_of(dumps, world_size):
    return build_report(dumps, world_size, Path("RUN"), 5.0).split("What happened: ", 1)[1].splitlines()[0]
