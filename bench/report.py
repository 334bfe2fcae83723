"""What the bench scripts report with their numbers: the commit the measured code came from, and the pipeline
benchmark's result table."""
from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """The commit the measured code came from, '+dirty' when headsup_core has uncommitted edits."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "headsup_core"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fmt(v, spec="{:.2f}") -> str:
    """A number for the table, '-' for a missing one."""
    return spec.format(v) if isinstance(v, (int, float)) else "-"


def format_table(results: list[dict]) -> str:
    head = ["model", "output", "path", "dtype", "status", "s/MP", "total s", "encode s", "unet s", "decode s",
            "cpu s", "peak GB", "PSNR dB", "ours/ref", "commit"]
    rows = []
    by_key = {(r["model"], tuple(r["size"]), r["path"]): r for r in results if r["path"] != "ours"}
    for r in results:
        ratio = "-"
        if r["path"] == "ours":
            ref = by_key.get((r["model"], tuple(r["size"]), "ref"), {})
            if r.get("total_s") and ref.get("total_s"):
                ratio = f"{r['total_s'] / ref['total_s']:.2f}"
            elif ref:
                ratio = "ref " + ref.get("status", "?").split(" (")[0]
        label = r["path"] + (" +compile" if r.get("compile") else "")
        rows.append([r["model"], "x".join(map(str, r["size"])), label, r.get("dtype", "-"),
                     r.get("status", "?").split(" (")[0], fmt(r.get("s_per_mp")), fmt(r.get("total_s")),
                     fmt(r.get("encode_s")), fmt(r.get("unet_s")), fmt(r.get("decode_s")), fmt(r.get("cpu_s")),
                     fmt(r.get("peak_gb")), "ref" if r["path"] == "full" else fmt(r.get("psnr_db"), "{:.1f}"), ratio,
                     r.get("code", "-")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = sorted({f"{r['path']} {'x'.join(map(str, r['size']))}: {r['tiles']}" for r in results if r.get("tiles")})
    notes += sorted({f"{r['path']} formats: {r['formats']}, attention {', '.join(r['attention'])}" for r in results
                     if r.get("formats")})
    notes += [f"{r['path']} {'x'.join(map(str, r['size']))} tile overhead (extra pixels computed): "
              + ", ".join(f"{k} {v:.0%}" for k, v in r["overhead"].items() if v is not None)
              for r in results if any(v is not None for v in (r.get("overhead") or {}).values())]
    notes += [f"code: {', '.join(sorted({r['code'] for r in results if r.get('code')}))}"]
    notes += [f"{r['model']} {r['path']} {'x'.join(map(str, r['size']))}: {r['status']}" for r in results
              if r.get("status", "ok") != "ok"]
    first = next((r for r in results if "device" in r), {})
    notes.append(f"device {first.get('device', '?')}, dtype {first.get('dtype', '?')}, torch threads "
                 f"{first.get('threads', '?')}; peak = {first.get('peak_kind', '?')}; times are medians; "
                 "ours/ref < 1 means ours is faster; PSNR against the fp32 untiled (full) output of the same size")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
