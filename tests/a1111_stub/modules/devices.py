"""Stand-in for modules.devices: device, dtype, cpu, torch_gc (counts its calls)."""
import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float16  # as A1111 on a GPU; the extension must still run fp32 on a CPU device
gc_calls = 0


def get_optimal_device():
    return device


def torch_gc():
    global gc_calls
    gc_calls += 1
