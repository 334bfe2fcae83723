"""Peak RSS of one exact-tiled SD2.1 VAE stage against memory.py's estimate (calibrates its constants).

    OMP_NUM_THREADS=1 python bench/vae_memory.py decoder 512 999   # stage, output side, tile (latents; 999 = untiled)

Random weights, fp32, CPU; prints one JSON line: measured MB (peak RSS above the process's level before the stage)
and the estimate in MB. One stage per process, so each peak is its own.
"""
import json, resource, sys, torch
from diffusers import AutoencoderKL
from headsup_core.loading.base import CONFIG_DIR
from headsup_core.tiled_vae import run_exact, decoder_forward, encoder_forward
from headsup_core import memory
from headsup_core.tiling import TilePlan
torch.set_grad_enabled(False)
stage, side, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
vae = AutoencoderKL.from_config(json.loads((CONFIG_DIR / "sd2" / "vae" / "config.json").read_text())).eval()
lat = side // 8
x = torch.randn(1, 4, lat, lat) if stage == "decoder" else torch.rand(1, 3, side, side) * 2 - 1
def rss():
    with open("/proc/self/status") as f:
        for l in f:
            if l.startswith("VmRSS"): return int(l.split()[1]) * 1024
base = rss()
peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cpu = torch.device("cpu")
if stage == "decoder":
    out = run_exact(decoder_forward, vae, x, tile=tile, context=11, in_factor=1, out_factor=8, compute_device=cpu)
else:
    out = run_exact(encoder_forward, vae, x, tile=tile, context=8, in_factor=8, out_factor=1, compute_device=cpu)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
class M: pass
m = M(); m.vae = vae; m.vae_scale = 8; m.dtype = torch.float32; m.unet = None
m.encoder_dtype = m.decoder_dtype = torch.float32
plan = TilePlan(encoder_tile=tile, decoder_tile=tile)
est = memory.stage_bytes(m, plan, (lat, lat), stage, cpu)
print(json.dumps({"stage": stage, "side": side, "tile": tile, "measured_mb": (peak - max(base, peak0)) / 2**20, "estimate_mb": est / 2**20}))
