"""Stand-in for comfy.model_patcher.ModelPatcher (only what the nodes use)."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size

    def model_size(self):
        from . import model_management
        return self.size or model_management.module_size(self.model)
