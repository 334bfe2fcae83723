"""Stand-in for comfy.model_management: CPU only, records what callers asked for."""
import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError

LOADS = []  # (models, memory_required, force_full_load) per load_models_gpu call
_interrupted = False


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def module_size(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    LOADS.append((list(models), memory_required, force_full_load))
    for m in models:
        m.model.to(m.load_device)


def free_memory(memory_required, device, keep_loaded=[]):
    return []


def soft_empty_cache(force=False):
    pass


def interrupt_current_processing(value=True):
    global _interrupted
    _interrupted = value


def processing_interrupted():
    return _interrupted


def throw_exception_if_processing_interrupted():
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise InterruptProcessingException()
