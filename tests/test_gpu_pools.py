"""GPU pools on a machine with a real NVIDIA GPU: each task sees only the device the scheduler
gave it (CUDA_VISIBLE_DEVICES), tasks that ask for more GPUs than are free take turns, and
the usage figures come from NVML as the device really is. Skipped, with the reason, where no
driver or GPU answers NVML."""

from __future__ import annotations

import subprocess

import pytest

from hog import wait_for
from velda.server import gpu_usage
from velda_cli import Velda

GIB = 1024**3

pytestmark = pytest.mark.skipif(not gpu_usage.available(),
                                reason=f"no GPU here: {gpu_usage.why_unavailable()}")

HOLD_GPU_MEMORY = """
import sys, time, torch
block = torch.ones(int(sys.argv[1]) * 1024**3 // 4, device="cuda")
torch.cuda.synchronize()
print(torch.cuda.device_count(), flush=True)
time.sleep(float(sys.argv[2]))
"""


def gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def cuda_from_python() -> bool:
    found = subprocess.run(["python3", "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, check=False)
    return found.stdout.strip() == "True"


def test_each_task_sees_only_the_gpus_it_was_given(velda: Velda) -> None:
    count = gpu_count()
    velda.configure(f"[pools.one]\ngpus = 1\n[pools.all]\ngpus = {count}\n")
    one = velda.vbatch("-P", "one", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; nvidia-smi -L')
    every = velda.vbatch("-P", "all", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"')
    assert velda.wait(one)["status"] == "SUCCESS"
    assert velda.wait(every)["status"] == "SUCCESS"
    seen = velda.log(one).stdout.splitlines()
    assert seen[0] in {str(i) for i in range(count)}  # one device, by its index here
    assert len([line for line in seen[1:] if line.startswith("GPU ")]) == 1  # all it can see
    assert velda.log(every).stdout.split()[0] == ",".join(str(i) for i in range(count))


def test_tasks_wanting_every_gpu_take_turns(velda: Velda) -> None:
    velda.configure(f"[pools.all]\ngpus = {gpu_count()}\n")
    first = velda.vbatch("-P", "all", "sleep", "2")
    second = velda.vbatch("-P", "all", "sleep", "1")
    done = [velda.wait(first), velda.wait(second)]
    assert [task["status"] for task in done] == ["SUCCESS", "SUCCESS"]
    assert done[1]["started_at"] >= done[0]["finished_at"]  # never both on the same devices


def test_gpu_memory_a_task_holds_shows_in_its_usage(velda: Velda) -> None:
    if not cuda_from_python():
        pytest.skip("python3 here has no PyTorch with CUDA to hold GPU memory with")
    script = velda.cwd / "hold_gpu.py"
    script.write_text(HOLD_GPU_MEMORY)
    velda.configure("[pools.gpu]\ngpus = 1\n")
    task_id = velda.vbatch("-P", "gpu", "python3", str(script), "4", "6")
    running = wait_for(velda, task_id, samples=3, timeout=60)
    device = running["gpus"][0]  # type: ignore[index]
    assert device["memory_bytes"] >= 4 * GIB  # what the task holds, as NVML sees it
    assert device["memory_total_bytes"] > device["memory_bytes"]
    task = velda.wait(task_id, timeout=120)
    assert task["status"] == "SUCCESS"
    assert velda.log(task_id).stdout.strip() == "1"  # torch saw the one device it was given
    usage = task["usage"]
    assert usage["final"] is True
    assert usage["gpus"][0]["peak_memory_bytes"] >= 4 * GIB
