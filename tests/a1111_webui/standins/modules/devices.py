"""Stand-in for modules.devices (CPU only): device, dtype, cpu, torch_gc, get_optimal_device."""
import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float16  # as on a GPU; the extension must run fp32 on a CPU device
dtype_vae = torch.float16
gc_calls = 0


def get_optimal_device():
    return device


def get_optimal_device_name():
    return "cpu"


def torch_gc():
    global gc_calls
    gc_calls += 1
