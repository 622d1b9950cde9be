"""``deepspeed --hostfile`` over real SSH: two loopback "nodes" (127.0.0.1 and 127.0.0.2, one slot each).

The test runs its own ``sshd`` on a free port of those two addresses, with host and client keys made in a temporary
directory, and points ``ssh`` (the launcher's reachability check and pdsh) at it through a wrapper that adds ``-F
<its own ssh_config>``; the user's ``~/.ssh`` and the system's sshd are never read or changed. The ranks' environment
reaches the "remote" nodes the way it does on a cluster: ``PYTHON*`` variables are exported by the launcher, the rest
through a ``.deepspeed_env`` file (``DS_ENV_FILE``).
"""
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from mplug_ds.engine.checkpoint import COMPLETE, complete_checkpoints, rank_state_file
from mplug_ds.runtime.launch_env import free_port
from tests.engine.engine_runs import DEEPSPEED, PRETRAIN, records, run_until_all_exit, step_losses
from tests.processes import REPO, child_env, kill_group, timeout, wait_for

pytestmark = pytest.mark.slow  # an sshd, pdsh and a 2-rank run

HOSTS = ("127.0.0.1", "127.0.0.2")
SBIN_PATH = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", os.environ.get("PATH", "")])
SSHD, PDSH, SSH, SSH_KEYGEN = (shutil.which("sshd", path=SBIN_PATH), shutil.which("pdsh"), shutil.which("ssh"),
                               shutil.which("ssh-keygen"))
STEPS = 2


def _listening(host, port):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _keygen(path):
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture
def loopback_sshd(tmp_path):
    """An sshd on 127.0.0.1 and 127.0.0.2 (a free port) accepting only a key made here; yields (port, env)."""
    if not (SSHD and PDSH and SSH and SSH_KEYGEN):
        pytest.skip("needs openssh-server (sshd), openssh-client and pdsh: apt-get install openssh-server pdsh "
                    "(.ci/run installs them)")
    privsep = "/run/sshd"  # sshd refuses to start without its privilege-separation directory (empty, root-owned)
    if not os.path.isdir(privsep):
        if os.geteuid() != 0:
            pytest.skip(f"sshd needs {privsep}, which only root can create")
        os.makedirs(privsep, mode=0o755)
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir(mode=0o700)
    _keygen(ssh_dir / "host_key")
    _keygen(ssh_dir / "client_key")
    (ssh_dir / "authorized_keys").write_text((ssh_dir / "client_key.pub").read_text())
    port, user = free_port(), getpass.getuser()
    (ssh_dir / "sshd_config").write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {h}" for h in HOSTS), f"HostKey {ssh_dir / 'host_key'}",
        f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}", f"PidFile {ssh_dir / 'sshd.pid'}", f"AllowUsers {user}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "LogLevel ERROR", ""]))
    host_key = (ssh_dir / "host_key.pub").read_text().split()
    (ssh_dir / "known_hosts").write_text(f"{','.join(f'[{h}]:{port}' for h in HOSTS)} {host_key[0]} {host_key[1]}\n")
    (ssh_dir / "ssh_config").write_text("\n".join([
        f"Host {' '.join(HOSTS)}", f"  User {user}", f"  IdentityFile {ssh_dir / 'client_key'}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {ssh_dir / 'known_hosts'}", "  StrictHostKeyChecking yes", "  BatchMode yes",
        "  LogLevel ERROR", ""]))
    bin_dir = tmp_path / "bin"  # `ssh` for the launcher's check and for pdsh: the real one with this config
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {SSH} -F {ssh_dir / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    env = child_env()
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    # What the remote ranks need beyond PYTHON*: the virtual environment's bin first on PATH (DeepSpeed JIT-builds its
    # CPU ops with the `ninja` found there; another ninja version would rebuild them) and one thread per rank.
    ds_env = tmp_path / "deepspeed_env"
    ds_env.write_text(f"PATH={os.pathsep.join([str(Path(sys.executable).parent), os.environ.get('PATH', '')])}\n"
                      "OMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\n")
    env["DS_ENV_FILE"] = str(ds_env)

    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(ssh_dir / "sshd_config")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: all(_listening(h, port) for h in HOSTS), 30, sshd, "sshd listening")
        yield port, env
    finally:
        for child in psutil.Process(sshd.pid).children(recursive=True):  # sessions and the ranks they started
            try:
                child.kill()
            except psutil.Error:
                pass
        kill_group(sshd)


def hostfile_command(tmp_path, port, out, *args):
    """``deepspeed --hostfile`` over the loopback sshd: rank 0 on 127.0.0.1, rank 1 on 127.0.0.2."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    return [str(DEEPSPEED), "--hostfile", str(hostfile), "--ssh_port", str(port), "--master_addr", HOSTS[0],
            "--master_port", str(free_port()), str(PRETRAIN), "--config", "synthetic_tiny", "eval.retrieval=false",
            "logging.progress_bar=false", f"run.output_dir={out}", *args]


def test_hostfile_launch_over_ssh_trains_one_world_of_two_ranks(loopback_sshd, tmp_path):
    port, env = loopback_sshd
    out = tmp_path / "run"
    command = hostfile_command(tmp_path, port, out, f"schedule.total_steps={STEPS}", "schedule.warmup_steps=1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout(300))
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the hostfile run did not end within {err.timeout:.0f} s:\n{(err.output or b'').decode()[-6000:]}")
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-6000:]}"
    assert "pdsh" in output and f"{HOSTS[1]}:" in output, "the second node was not reached over pdsh/ssh"

    start = next(r for r in records(out) if r["event"] == "start")
    assert start["world_size"] == 2
    steps = step_losses(out)
    assert sorted(steps) == list(range(1, STEPS + 1)) and steps[STEPS]["samples"] == STEPS * 4 * 2
    [(step, tag_dir)] = complete_checkpoints(out / "checkpoints")
    assert step == STEPS and json.loads((tag_dir / COMPLETE).read_text())["world_size"] == 2
    for rank in (0, 1):  # both ranks trained: each consumed STEPS batches of its own stream and saved its ZeRO part
        state = torch.load(rank_state_file(tag_dir, rank), weights_only=True)
        assert state["data"] == {"next_index": STEPS, "seed": 42, "rank": rank}
        assert list(tag_dir.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))


def test_a_rank_killed_on_the_second_node_is_named_missing_in_the_hang_report(loopback_sshd, tmp_path):
    """The dead-peer case over SSH: rank 1 (node 127.0.0.2) SIGKILLs itself at step 3; rank 0 stops within seconds,
    the report in the (here shared) run directory names rank 1, and its path reaches the launcher's output."""
    port, env = loopback_sshd
    with open(env["DS_ENV_FILE"], "a") as f:  # the fault reaches the "remote" ranks like any variable
        f.write("MPLUG_DS_FAULT=sigkill:1:3\n")
    out = tmp_path / "run"
    command = hostfile_command(tmp_path, port, out, "schedule.total_steps=8", "logging.every_steps=1",
                               "checkpoint.save_final=false", f"run.hang_timeout_s={timeout(3):g}")
    ended = run_until_all_exit(command, 25.0, mark="step 2/8", fault="sigkill:1:3", env=env)
    assert ended.code != 0
    assert f"{HOSTS[0]}: rank 0: hang report: {out}/hang/report.txt" in ended.output  # through pdsh
    report = (out / "hang" / "report.txt").read_text()
    assert re.search(r"What happened: rank 1 wrote no report within \d+ s: gone \(killed, crashed\) or frozen", report)
    wait_for(lambda: not _ranks_alive(out), 20)  # the ranks under sshd are gone too, not only the launcher


def _ranks_alive(out):
    for proc in psutil.process_iter(["cmdline"]):
        if f"run.output_dir={out}" in " ".join(proc.info["cmdline"] or []) and "launch/pretrain.py" in " ".join(
                proc.info["cmdline"] or []):
            return True
    return False
