"""Run VBench on lpq's saved PNG frames. Runs inside a SEPARATE venv that has vbench installed.

vbench 0.1.5 pins transformers 4.33 and numpy<2, so it cannot live in lpq's venv; `lpq eval` calls
this file with that venv's python (eval.video.vbench_python). It imports only the standard library,
numpy, opencv and vbench (all in that venv), never lpq. Usage:

    python vbench_runner.py --frames DIR --out DIR [--dimensions temporal_flickering,...] [--fps 8]

DIR holds one folder of frame_*.png per video; each becomes an mp4 and VBench scores them in its
`custom_input` mode. The last stdout line is JSON: {dimension: mean score}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def frames_to_mp4(folder: Path, target: Path, fps: int) -> None:
    import cv2

    frames = sorted(folder.glob("frame_*.png"))
    if not frames:
        raise FileNotFoundError(f"no frame_*.png in {folder}")
    first = cv2.imread(str(frames[0]))
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        writer.write(cv2.imread(str(f)))
    writer.release()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dimensions", default="temporal_flickering")
    ap.add_argument("--fps", type=int, default=8)
    args = ap.parse_args()

    import torch
    from vbench import VBench

    videos = args.out / "mp4"
    videos.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in args.frames.iterdir() if p.is_dir()):
        frames_to_mp4(folder, videos / f"{folder.name}.mp4", args.fps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = [d for d in args.dimensions.split(",") if d]
    VBench(device, None, str(args.out)).evaluate(videos_path=str(videos), name="lpq", dimension_list=dims,
                                                 mode="custom_input")
    result = json.loads(next(args.out.glob("*_eval_results.json")).read_text())
    print(json.dumps({dim: value[0] for dim, value in result.items()}))


if __name__ == "__main__":
    main()
