"""Which normalisation makes `maest similar` work, and where the near-duplicate threshold goes
(README "similar" figures). On a demo corpus's downstream clips embedded with maest-tiny:

    maest extract CORPUS/downstream --out EMB --model maest-tiny
    .venv/bin/python examples/similar_normalisation.py CORPUS/downstream EMB WORK [N_COPIES [FIT_EMB]]

makes copies of N_COPIES clips (every k-th, sorted: MP3; MP3 with 1.3 s cut from the start;
Ogg Vorbis with 1.3 s cut from the end; WAV), embeds them like the clips, and prints JSON lines
per normalisation: the rank of the original among all downstream clips for each kind of copy,
the cosine distributions of copy/original pairs, of two renderings of one piece (r0/r1/...,
different recordings) and of clips of different pieces, and how often a clip's nearest other
clip is a rendering of its own piece. FIT_EMB (e.g. CORPUS/pretrain embedded the same way): more
tracks to fit the normalisation on, as in a larger catalogue.
"""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from maest_cli.catalogue.index import fit_normalisation
from maest_cli.embed.extraction import extract
from maest_cli.embed.reading import open_embeddings

CUT_S = 1.3
COPIES = {"mp3": ("MP3", "MPEG_LAYER_III", 0.0, 0.0), "mp3-cut-start": ("MP3", "MPEG_LAYER_III", CUT_S, 0.0),
          "ogg-cut-end": ("OGG", "VORBIS", 0.0, CUT_S), "wav": ("WAV", "PCM_16", 0.0, 0.0)}
EXT = {"MP3": "mp3", "OGG": "ogg", "WAV": "wav"}
SETTINGS = [("raw", None), ("centred", None), ("whitened", 8), ("whitened", 16), ("whitened", 24), ("whitened", 32),
            ("whitened", 48), ("whitened", 64), ("whitened", 128), ("whitened", None)]


def piece_of(path: str) -> str:
    return re.sub(r"-r\d+\.\w+$", "", path)


def make_copies(downstream: Path, originals: list[str], out: Path) -> None:
    for rel in originals:
        x, sr = sf.read(downstream / rel, always_2d=True)
        for kind, (fmt, subtype, start, end) in COPIES.items():
            dst = out / kind / (rel.rsplit(".", 1)[0] + "." + EXT[fmt])
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            sf.write(dst, x[int(start * sr):len(x) - int(end * sr)], sr, format=fmt, subtype=subtype)


def track_matrix(directory) -> tuple[list[str], np.ndarray]:
    emb = open_embeddings(directory)
    return emb.paths, emb.matrix(np.arange(len(emb.paths)))


def quantiles(v: np.ndarray) -> dict:
    return {"n": int(len(v)), "min": round(float(v.min()), 4), "p5": round(float(np.quantile(v, 0.05)), 4),
            "median": round(float(np.median(v)), 4), "p95": round(float(np.quantile(v, 0.95)), 4),
            "max": round(float(v.max()), 4)}


def main(downstream: str, emb_dir: str, work: str, n_copies: int = 30, fit_dir: str | None = None) -> None:
    downstream, work = Path(downstream), Path(work)
    paths, x = track_matrix(emb_dir)
    fit_x = np.concatenate([x, track_matrix(fit_dir)[1]]) if fit_dir else x
    step = max(1, len(paths) // n_copies)
    originals = sorted(paths)[::step][:n_copies]
    make_copies(downstream, originals, work / "copies")
    copies = {}
    for kind in COPIES:
        extract([str(work / "copies" / kind)], work / "emb" / kind, model="maest-tiny", workers=0, progress=False)
        cp, cx = track_matrix(work / "emb" / kind)
        copies[kind] = (cp, cx)
    row = {p: i for i, p in enumerate(paths)}
    pieces = np.array([piece_of(p) for p in paths])
    collections = np.array([Path(p).parent.name for p in paths])
    same_piece = pieces[:, None] == pieces[None, :]
    upper = np.triu(np.ones_like(same_piece), 1)
    done = set()
    for kind, dims in SETTINGS:
        norm = fit_normalisation(fit_x, kind, dims)
        if (norm.kind, norm.out_dim) in done:
            continue
        done.add((norm.kind, norm.out_dim))
        v = norm.apply(x)
        sims = v @ v.T
        result = {"normalisation": norm.kind, "dims": norm.out_dim, "tracks": len(paths), "fitted_on": len(fit_x)}
        copy_sims, ranks = [], {}
        for ck, (cp, cx) in copies.items():
            q = norm.apply(cx)
            s = q @ v.T
            orig = np.array([row[re.sub(r"\.\w+$", "", c) + "." + originals[0].rsplit(".", 1)[1]] for c in cp])
            own = s[np.arange(len(cp)), orig]
            ranks[ck] = (1 + (s > own[:, None]).sum(1)).tolist()
            copy_sims.append(own)
        result["copy_rank1"] = {ck: f"{sum(r == 1 for r in rs)}/{len(rs)}" for ck, rs in ranks.items()}
        result["copy_worst_rank"] = {ck: max(rs) for ck, rs in ranks.items()}
        result["same_recording"] = quantiles(np.concatenate(copy_sims))
        result["other_rendering"] = quantiles(sims[same_piece & upper.astype(bool)])
        result["other_piece"] = quantiles(sims[~same_piece & upper.astype(bool)])
        same = np.concatenate(copy_sims)
        top_other = max(result["other_rendering"]["max"], result["other_piece"]["max"])
        result["copies_above_every_other_pair"] = f"{int((same > top_other).sum())}/{len(same)}"
        result["margin"] = round(float(same.min()) - top_other, 4)
        nn = np.where(np.eye(len(paths), dtype=bool), -np.inf, sims).argmax(1)
        has_other = same_piece.sum(1) > 1
        result["nearest_is_same_piece"] = f"{int((same_piece[np.arange(len(paths)), nn] & has_other).sum())}/" \
                                          f"{int(has_other.sum())}"
        # "sounds like": the 5 nearest other clips from the clip's own collection (style, ensemble)
        top5 = np.argsort(-np.where(np.eye(len(paths), dtype=bool), -np.inf, sims), axis=1)[:, :5]
        result["top5_same_collection"] = round(float((collections[top5] == collections[:, None]).mean()), 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MAEST_OFFLINE", "1")
    main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:5]), *sys.argv[5:6])
