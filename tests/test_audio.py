"""Audio: decoding, checks, folder layouts and labels, the speech embedding backbone, end to end.

Fast tier: generated tones and noise written with soundfile (WAV, FLAC, OGG) into tmp dirs; the
real bundled encoder (it is small: a few windows take well under a second). Slow tier: a slice of
the shared spoken-digits set.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tl_cli.core.errors import TLError
from tl_cli.modalities.audio import backbone as speech
from tl_cli.modalities.audio import data as audio
from tl_cli.modalities.audio.data import AudioFolderDataModule, check_audio, decode, load_audio

from .conftest import ROOT, run_tl

SHARED_DIGITS = ROOT.parent / "shared" / "data" / "spoken-digits-3speakers"
TONES = {"low": 300.0, "high": 1500.0, "noise": None}


def clip(kind: float | None, sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * kind * t) if kind else 0.2 * rng.standard_normal(len(t))
    return (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def make_audio_folder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/*.{wav,flac,ogg}: tones and noise at mixed rates, lengths, channels."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    rates = (8000, 16000, 22050, 44100)
    exts = (".wav", ".flac", ".ogg")
    for split, n in per_split.items():
        for cls, f in TONES.items():
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                sr = rates[i % len(rates)]
                x = clip(f, sr, float(rng.uniform(0.3, 1.6)), rng)
                if i % 2:
                    x = np.stack([x, 0.5 * x], 1)  # stereo
                sf.write(d / f"{cls}_{i:02d}{exts[i % 3]}", x, sr)
    return root


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train (8 per class) + test (3 per class), 3 classes."""
    return make_audio_folder(tmp_path_factory.mktemp("tones"), {"train": 8, "test": 3})


@pytest.fixture(scope="module")
def backbone() -> speech.SpeechEmbeddingBackbone:
    return speech.build_speech().eval()


def wav_header(path: Path, sr: int, data: bytes = b"\x00\x10" * 800) -> Path:
    """A hand-written 16-bit mono PCM WAV with any sample rate in its header (even 0)."""
    fmt = struct.pack("<HHIIHH", 1, 1, sr, sr * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "ext,subtype",
    [
        (".wav", "PCM_U8"),
        (".wav", "PCM_16"),
        (".wav", "PCM_24"),
        (".wav", "PCM_32"),
        (".wav", "FLOAT"),
        (".flac", "PCM_16"),
        (".flac", "PCM_24"),
        (".ogg", "VORBIS"),
    ],
)
def test_decode_formats_and_bit_depths(tmp_path: Path, ext: str, subtype: str):
    import soundfile as sf

    rng = np.random.default_rng(0)
    x = clip(440.0, 16000, 0.5, rng)
    p = tmp_path / f"a{ext}"
    sf.write(p, x, 16000, subtype=subtype)
    y, rate = decode(p)
    assert rate == 16000 and y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 1 or ext == ".ogg"
    # same waveform up to the format's precision (u8: 1/128; vorbis is lossy)
    tol = {"PCM_U8": 0.02, "VORBIS": 0.1}.get(subtype, 1e-3)
    n = min(len(x), len(y))
    assert np.abs(y[:n] - x[:n]).max() < tol


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000])
def test_resampled_to_16k(tmp_path: Path, sr: int):
    import soundfile as sf

    x = clip(440.0, sr, 1.0, np.random.default_rng(0))
    sf.write(tmp_path / "a.wav", x, sr)
    y = load_audio(tmp_path / "a.wav", 16000)
    assert abs(len(y) - 16000) <= 1
    # the tone survives: its spectrum peaks at 440 Hz
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 5


def test_stereo_is_downmixed(tmp_path: Path):
    import soundfile as sf

    x = clip(440.0, 16000, 0.5, np.random.default_rng(0))
    sf.write(tmp_path / "s.wav", np.stack([x, np.zeros_like(x), x], 1), 16000)
    y, _ = decode(tmp_path / "s.wav")
    assert np.allclose(y, x * 2 / 3, atol=1e-4)


def make_bad_files(d: Path) -> dict[str, Path]:
    import soundfile as sf

    d.mkdir(parents=True, exist_ok=True)
    bad = {
        "empty": d / "empty.wav",
        "text": d / "text.wav",
        "random": d / "random.flac",
        "truncated": d / "truncated.wav",
        "silent": d / "silent.wav",
        "rate0": d / "rate0.wav",
        "rate100": d / "rate100.wav",
    }
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not audio\n" * 20)
    bad["random"].write_bytes(np.random.default_rng(0).bytes(4000))
    bad["truncated"].write_bytes(wav_header(d / "tmp.wav", 16000).read_bytes()[:30])
    (d / "tmp.wav").unlink()
    sf.write(bad["silent"], np.zeros(8000, np.float32), 8000)
    wav_header(bad["rate0"], 0)
    wav_header(bad["rate100"], 100)
    return bad


def test_bad_files_have_one_line_reasons(tmp_path: Path):
    bad = make_bad_files(tmp_path)
    want = {
        "empty": "empty file",
        "text": "not an audio file",
        "random": "not an audio file",
        "truncated": "corrupt or truncated",
        "silent": "silent clip",
        "rate0": "header the decoder cannot read",
        "rate100": "sample rate 100 Hz",
    }
    for k, p in bad.items():
        reason = check_audio(p)
        assert reason and want[k] in reason and "\n" not in reason, (k, reason)
        with pytest.raises(TLError, match=str(p)):
            decode(p)
    good = wav_header(tmp_path / "good.wav", 8000)
    assert check_audio(good) is None


def test_bad_file_in_folder_fails_scan_or_is_skipped(tones: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(tones, root)
    bad = make_bad_files(tmp_path / "bad")
    for i, p in enumerate(bad.values()):
        shutil.copy(p, root / "train" / ("low", "high", "noise")[i % 3] / p.name)
    with pytest.raises(TLError) as e:
        AudioFolderDataModule(root=str(root)).prepare()
    msg = str(e.value)
    assert "\n" not in msg and "skip_corrupt=true" in msg and "more unreadable audio file(s)" in msg
    dm = AudioFolderDataModule(root=str(root), skip_corrupt=True).prepare()
    assert len(dm.skipped_corrupt) == len(bad)
    assert sum(len(v) for v in dm.splits.values()) == 3 * (8 + 3)


# --------------------------------------------------------------------------- layouts, labels


def test_three_layouts(tmp_path: Path):
    a = make_audio_folder(tmp_path / "a", {"train": 4, "val": 2, "test": 2})
    b = make_audio_folder(tmp_path / "b", {"train": 6, "test": 2})
    c = make_audio_folder(tmp_path / "c", {"": 6})
    for root, splits in ((a, "train val test"), (b, "train val test"), (c, "train val")):
        dm = AudioFolderDataModule(root=str(root)).prepare()
        assert dm.class_names == ["high", "low", "noise"]
        assert " ".join(dm.splits) == splits


def test_layout_errors_speak_audio(tmp_path: Path):
    root = make_audio_folder(tmp_path / "x", {"train": 2})
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(TLError, match="class folder has no audio files"):
        AudioFolderDataModule(root=str(root)).prepare()


def test_label_from_regex(tmp_path: Path):
    import soundfile as sf

    rng = np.random.default_rng(0)
    for digit in ("0", "1"):
        d = tmp_path / digit
        d.mkdir()
        for spk in ("ann", "bob", "cat"):
            for take in range(3):
                sf.write(d / f"{digit}_{spk}_{take}.wav", clip(300.0, 8000, 0.4, rng), 8000)
    dm = AudioFolderDataModule(
        root=str(tmp_path), label_from="regex", label_regex=r"^\d+_([a-z]+)_", val_fraction=0.34
    ).prepare()
    assert dm.class_names == ["ann", "bob", "cat"]
    for split in ("train", "val"):
        for path, y in dm.splits[split]:
            assert f"_{dm.class_names[y]}_" in Path(path).name
    with pytest.raises(TLError, match="exactly one group"):
        AudioFolderDataModule(root=str(tmp_path), label_from="regex", label_regex=r"^(\d)_(\w)")
    with pytest.raises(TLError, match="not a valid regex"):
        AudioFolderDataModule(root=str(tmp_path), label_from="regex", label_regex="(")
    with pytest.raises(TLError, match="needs dataset.label_regex"):
        AudioFolderDataModule(root=str(tmp_path), label_from="regex")
    with pytest.raises(TLError, match="label_from"):
        AudioFolderDataModule(root=str(tmp_path), label_from="name")
    sf.write(tmp_path / "0" / "odd.wav", clip(300.0, 8000, 0.4, rng), 8000)
    with pytest.raises(TLError, match=r"odd.wav: file name does not match"):
        AudioFolderDataModule(
            root=str(tmp_path), label_from="regex", label_regex=r"^\d+_([a-z]+)_"
        ).prepare()


def test_batches_pad_and_augment(tones: Path, backbone):
    dm = AudioFolderDataModule(root=str(tones), num_workers=0, batch_size=4).prepare()
    dm.set_preprocessing(backbone.preprocessing)
    x, y = next(iter(dm.make_loader(dm.dataset("test"), shuffle=False)))
    assert set(x) == {"audio", "lengths"} and x["audio"].shape[0] == 4 == len(y)
    assert int(x["lengths"].min()) >= speech.MIN_SAMPLES
    assert int(x["lengths"].max()) == x["audio"].shape[1]
    xt, _ = next(iter(dm.make_loader(dm.dataset("train"), shuffle=True)))
    assert xt["spec_augment"].all()
    # light augmentation changes the waveform; eval does not
    ds_aug, ds_eval = dm.dataset("train"), dm.dataset("train", train_aug=False)
    torch.manual_seed(0)
    assert not torch.equal(ds_aug[0][0][: len(ds_eval[0][0])], ds_eval[0][0])
    assert torch.equal(ds_eval[0][0], ds_eval[0][0])


def test_max_seconds_crops(tmp_path: Path):
    import soundfile as sf

    make_audio_folder(tmp_path, {"": 2})
    sf.write(
        tmp_path / "low" / "long.wav", clip(300.0, 16000, 5.0, np.random.default_rng(0)), 16000
    )
    dm = AudioFolderDataModule(root=str(tmp_path), max_seconds=2.0, val_fraction=0.5).prepare()
    assert dm.preprocessing_overrides() == {"max_seconds": 2.0}
    prep = speech.build_speech().effective_preprocessing(dm.preprocessing_overrides())
    dm.set_preprocessing(prep)
    ds = dm.dataset("train", train_aug=False)
    items = ds.items + dm.splits["val"]
    ds.items = [it for it in items if it[0].endswith("long.wav")]
    assert len(ds[0][0]) == 32000


# --------------------------------------------------------------------------- backbone


def test_backbone_contract(backbone):
    names = [n for n, _ in backbone.named_parameters()]
    groups = backbone.block_groups()
    assert 4 <= len(groups) <= 6
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert sum(p.numel() for p in backbone.parameters()) == 328_152
    assert backbone.num_features == 96 and backbone.modality == "audio"
    json.dumps(backbone.preprocessing)  # plain data
    # every parameter receives a gradient
    b = speech.build_speech().train()
    out = b({"audio": torch.randn(2, 16000) * 0.1, "spec_augment": torch.ones(2, dtype=torch.bool)})
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())


def test_frontend_and_encoder_match_onnxruntime(backbone):
    """The torch port against the ONNX graphs (onnxruntime), on tones, a chirp and noise."""
    ort = pytest.importorskip("onnxruntime")
    d = speech.model_dir()
    mel_s = ort.InferenceSession(str(d / "melspectrogram.onnx"))
    emb_s = ort.InferenceSession(str(d / "embedding_model.onnx"))
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    signals = [
        clip(300.0, 16000, 1.0, rng),
        (0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)).astype(np.float32),
        (0.1 * rng.standard_normal(16000)).astype(np.float32),
    ]
    for x in signals:
        x16 = np.round(x * 32768).astype(np.float32)
        ref = mel_s.run(None, {"input": x16[None]})[0].squeeze()
        with torch.no_grad():
            mine = backbone.frontend(torch.from_numpy(x16 / 32768)[None])[0].numpy()
        assert np.abs(ref - mine).max() < speech.MEL_TOLERANCE
        spec = ref / 10 + 2
        wins = np.stack([spec[i : i + 76] for i in range(0, spec.shape[0] - 75, 8)])
        r = emb_s.run(None, {"input_1": wins[..., None].astype(np.float32)})[0]
        with torch.no_grad():
            e = backbone.encoder(torch.from_numpy(wins.astype(np.float32))).numpy()
        assert np.abs(r.reshape(len(wins), -1) - e).max() < speech.EMBED_TOLERANCE


def test_padding_is_masked_out_of_the_pool(backbone):
    x = torch.from_numpy(clip(300.0, 16000, 1.3, np.random.default_rng(1)))
    with torch.no_grad():
        alone = backbone(x[None])
        padded = torch.cat([x, torch.zeros(9000)])[None]
        batched = backbone({"audio": padded, "lengths": torch.tensor([len(x)])})
        short = backbone(x[None, :4000])  # shorter than one window: padded inside
    assert torch.allclose(alone, batched, atol=1e-4)
    assert short.shape == (1, 96) and torch.isfinite(short).all()


def test_attention_pooling_starts_as_mean():
    torch.manual_seed(0)
    mean = speech.build_speech(pooling="mean").eval()
    att = speech.build_speech(pooling="attention").eval()
    x = torch.randn(2, 30000) * 0.1
    with torch.no_grad():
        assert torch.allclose(mean(x), att(x), atol=1e-5)
    assert any("attention" in n for n in att.block_groups()[-1])
    with pytest.raises(TLError, match="pooling"):
        speech.build_speech(pooling="max")
    with pytest.raises(TLError, match="not a speech backbone"):
        speech.build_speech(name="wav2vec2")


def test_meanstd_pooling_and_context_padding():
    """The config's windows (pad_frames=38 of silence each side, window_stride=16) and statistics
    pooling: 192 features whose first half is pooling=mean's; batch padding stays masked out."""
    kw = {"pad_frames": 38, "window_stride": 16, "normalize": False}
    ms = speech.build_speech(pooling="meanstd", **kw).eval()
    mean = speech.build_speech(pooling="mean", **kw).eval()
    assert ms.num_features == 192 and mean.num_features == 96
    assert ms.preprocessing["pad_frames"] == 38 and ms.preprocessing["window_stride"] == 16
    # the model's own padding makes up one window: the data pads far less
    assert ms.preprocessing["min_samples"] < speech.MIN_SAMPLES
    x = torch.from_numpy(clip(300.0, 16000, 0.5, np.random.default_rng(2)))
    with torch.no_grad():
        alone = ms(x[None])
        padded = torch.cat([x, torch.zeros(9000)])[None]
        batched = ms({"audio": padded, "lengths": torch.tensor([len(x)])})
        m = mean(x[None])
        short = ms(x[None, :600])  # 38 ms: padded to one window by the model
        # 0.5 s + 2 x 0.38 s of silence: 3 windows at stride 16, not 1 as without padding
        mel = ms.frontend(F.pad(x, (38 * speech.HOP, 38 * speech.HOP))[None])
        assert ms.windows(mel).shape[1] == 3
    assert alone.shape == (1, 192) and torch.allclose(alone, batched, atol=1e-4)
    assert torch.allclose(alone[:, :96], m, atol=1e-4)
    assert float(alone[:, 96:].mean()) > 0.1  # a spread over the windows, not the eps floor
    assert short.shape == (1, 192) and torch.isfinite(short).all()
    # one window: the std is 0 and its gradient must stay finite
    one = speech.build_speech(pooling="meanstd")
    one(torch.randn(1, speech.MIN_SAMPLES) * 0.1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in one.parameters() if p.grad is not None)
    for bad in ({"pad_frames": -1}, {"pad_frames": 1.5}, {"window_stride": 0}):
        with pytest.raises(TLError, match=next(iter(bad))):
            speech.build_speech(**bad)


def test_voice_features_are_mel_band_statistics_of_the_clip_alone():
    """backbone.features=voice: the mean and std of each mel band over the clip's own frames
    (context and batch padding left out); both = words then voice."""
    kw = {"pooling": "meanstd", "pad_frames": 38, "window_stride": 16, "normalize": False}
    voice = speech.build_speech(features="voice", **kw).eval()
    both = speech.build_speech(features="both", **kw).eval()
    words = speech.build_speech(features="words", **kw).eval()
    assert (voice.num_features, both.num_features) == (64, 256)
    assert voice.preprocessing["features"] == "voice"
    x = torch.from_numpy(clip(300.0, 16000, 0.7, np.random.default_rng(3)))
    with torch.no_grad():
        v = voice(x[None])
        batched = voice(
            {"audio": torch.cat([x, torch.zeros(7000)])[None], "lengths": torch.tensor([len(x)])}
        )
        # the definition, by hand: the frames that lie within the clip, nothing else
        mel = voice.frontend(F.pad(x, (38 * speech.HOP, 38 * speech.HOP))[None])[0] / 10 + 2
        frames = mel[38 : 38 + (len(x) - speech.N_FFT) // speech.HOP + 1]
        want = torch.cat([frames.mean(0), (frames.var(0, unbiased=False) + 1e-5).sqrt()])
        b = both(x[None])
    assert torch.allclose(v[0], want, atol=1e-3)
    assert torch.allclose(v, batched, atol=1e-4)
    assert torch.allclose(b[:, :192], words(x[None]), atol=1e-4) and torch.allclose(
        b[:, 192:], v, atol=1e-4
    )
    with pytest.raises(
        TLError, match="backbone.features='speaker' must be one of words, voice, both"
    ):
        speech.build_speech(features="speaker")


# --------------------------------------------------------------------------- end to end


def _train(root: Path, out: Path, *extra: str, command: str = "train"):
    r = run_tl(
        command,
        "modality=audio",
        f"dataset.root={root}",
        "dataset.num_workers=0",
        "dataset.batch_size=8",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        f"hydra.run.dir={out}",
        *extra,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_train_eval_cli(tones: Path, tmp_path: Path):
    m = _train(tones, tmp_path / "fe", "trainer.max_epochs=15")  # cached: epochs are cheap
    assert m["backbone"] == "speech_embedding" and m["strategy"] == "feature_extraction"
    assert m["test/acc"] >= 0.6  # two tones and noise: easy for a linear head
    ckpt = tmp_path / "fe" / "checkpoints" / "best.ckpt"
    other = make_audio_folder(tmp_path / "other", {"": 2}, seed=5)
    r = run_tl(
        "eval", f"checkpoint={ckpt}", f"dataset.root={other}", f"output_dir={tmp_path / 'ev'}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["num_samples"] == 6 and ev["split"] == "all"


def test_finetune_and_unfreezing_strategies(tones: Path, tmp_path: Path):
    m = _train(tones, tmp_path / "ft", "trainer.max_epochs=1", command="finetune")
    assert m["strategy"] == "finetune" and np.isfinite(m["test/loss"])
    m = _train(tones, tmp_path / "gu", "strategy=gradual_unfreeze", "backbone.pooling=attention")
    assert m["strategy"] == "gradual_unfreeze" and np.isfinite(m["test/loss"])


def test_bad_audio_cli_is_one_line(tones: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(tones, root)
    (root / "train" / "low" / "broken.wav").write_text("not audio")
    r = run_tl("train", "modality=audio", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.returncode == 2
    err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and "broken.wav" in err[0] and "not an audio file" in err[0]


# --------------------------------------------------------------------------- slow: real speech


def shared_digits() -> Path:
    if SHARED_DIGITS.is_dir():
        return SHARED_DIGITS
    if os.environ.get("TL_REQUIRE_SHARED") == "1":
        pytest.fail(f"TL_REQUIRE_SHARED=1 but {SHARED_DIGITS} is missing")
    pytest.skip(f"{SHARED_DIGITS} not present")


@pytest.mark.slow
def test_real_speech_digits(tmp_path: Path):
    """Digits 0-9, speakers george+jackson (train, 8 takes each) -> lucas (test, 4 takes each).

    Measured: test acc 1.00 with the config's windows (pad_frames=38, stride 16, meanstd; 0.85
    with the earlier single centred window, fit 33 s); fit 106 s, the whole test 200 s on 2 CPU
    cores shared with two benchmarks. The threshold, 0.85, is the old recipe's score: the frozen
    head is deterministic, and it leaves room for platform differences on 40 test clips.
    """
    src = shared_digits()
    root = tmp_path / "digits"
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        for spk, split, n in (
            ("george", "train", 8),
            ("jackson", "train", 8),
            ("lucas", "test", 4),
        ):
            out = root / split / d.name
            out.mkdir(parents=True, exist_ok=True)
            for take in range(n):
                f = d / f"{d.name}_{spk}_{take}.wav"
                os.symlink(f, out / f.name)
    # the torch port matches onnxruntime on real speech too
    ort = pytest.importorskip("onnxruntime")
    bb = speech.build_speech().eval()
    x = load_audio(src / "3" / "3_lucas_0.wav", 16000)
    x16 = np.round(audio.fit_length(x, speech.MIN_SAMPLES, None, None) * 32768).astype(np.float32)
    ref = (
        ort.InferenceSession(str(speech.model_dir() / "melspectrogram.onnx"))
        .run(None, {"input": x16[None]})[0]
        .squeeze()
    )
    with torch.no_grad():
        mine = bb.frontend(torch.from_numpy(x16 / 32768)[None])[0].numpy()
    assert np.abs(ref - mine).max() < speech.MEL_TOLERANCE
    m = _train(root, tmp_path / "run", "trainer.max_epochs=20")
    print(f"real speech digits: test acc {m['test/acc']:.3f}, fit {m['fit_seconds']:.0f} s")
    assert m["test/acc"] >= 0.85, m["test/acc"]


def test_predict_and_export(tones: Path, tmp_path: Path):
    """tl predict on a folder of clips; tl export (onnx, torchscript, safetensors), each checked
    against PyTorch, with a sidecar that records the front end."""
    out = tmp_path / "run"
    _train(tones, out, "trainer.max_epochs=1")
    ckpt = out / "checkpoints" / "best.ckpt"
    r = run_tl(
        "predict", f"checkpoint={ckpt}", f"inputs={tones / 'test'}", f"output={tmp_path / 'p.csv'}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "p.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 9
    for fmt, ext in (("onnx", "onnx"), ("torchscript", "pt"), ("safetensors", "safetensors")):
        model = tmp_path / fmt / f"m.{ext}"
        r = run_tl("export", f"checkpoint={ckpt}", f"format={fmt}", f"output={model}")
        assert r.returncode == 0, r.stderr[-3000:]
        side = json.loads(model.with_suffix(".json").read_text())
        assert side["modality"] == "audio" and side["input"]["sample_rate"] == 16000
        assert side["preprocessing"]["window_frames"] == 76
        # the config's defaults: statistics pooling over windows padded with context
        assert side["preprocessing"]["pooling"] == "meanstd"
        assert side["input"]["front_end"]["pad_frames"] == 38
        assert side["verification"]["passed"] is True, side["verification"]
        if fmt == "onnx":  # the graph takes any batch and any clip length from one window up
            assert "torch.export" in side["exporter"], side["exporter"]


def test_a_wav_cut_short_is_refused(tmp_path: Path):
    """Issue 23: a WAV cut to half its length decoded as a clip of half the length, silently
    (libsndfile reads what is there). Its header says how many bytes of samples it should hold."""
    import soundfile as sf

    x = (0.3 * np.sin(np.arange(16000) / 5.0)).astype(np.float32)
    full = tmp_path / "full.wav"
    sf.write(full, x, 16000, subtype="PCM_16")
    data = full.read_bytes()
    half = tmp_path / "half.wav"
    half.write_bytes(data[: len(data) // 2])
    assert len(sf.read(half)[0]) < 8000  # the control: the decoder takes it as a shorter clip
    assert check_audio(full) is None
    reason = check_audio(half)
    assert reason is not None and reason.startswith("truncated WAV: its header says 32000 bytes")
    with pytest.raises(TLError, match=r"half.wav: truncated WAV"):
        load_audio(half, 16000)
    nearly = tmp_path / "nearly.wav"
    nearly.write_bytes(data[:-2])  # one sample short: within the tolerance of sloppy writers
    assert check_audio(nearly) is None


def test_group_regex_holds_out_whole_words_and_warns_on_a_text_dependent_val(
    tmp_path: Path, capsys
):
    """Speaker ID scored on unseen words: dataset.group_regex carves val by word; a val/ folder
    that repeats train's words while test's are new gets one warning line."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    for split, digits in (("train", "0123"), ("test", "89")):
        for digit in digits:
            d = tmp_path / split / digit
            d.mkdir(parents=True)
            for spk in ("ann", "bob"):
                for take in range(2):
                    sf.write(d / f"{digit}_{spk}_{take}.wav", clip(300.0, 8000, 0.3, rng), 8000)
    kw = {"label_from": "regex", "label_regex": r"^\d+_([a-z]+)_", "val_fraction": 0.25}
    dm = AudioFolderDataModule(root=str(tmp_path), group_regex=r"^(\d+)_", **kw).prepare()
    g = dm.split_groups()
    assert len(g["val"]) == 1 and not g["val"] & g["train"] and g["test"] == {"8", "9"}
    assert "val holds out group(s)" in dm.layout
    assert {y for _, y in dm.splits["val"]} == {0, 1}  # both speakers say the held-out word
    assert "shares its dataset.group_regex groups" not in capsys.readouterr().out
    # the same seed, the same words held out
    again = AudioFolderDataModule(root=str(tmp_path), group_regex=r"^(\d+)_", **kw).prepare()
    assert again.splits["val"] == dm.splits["val"]
    # a val/ folder with train's words, test with new ones: one warning line
    (tmp_path / "val" / "0").mkdir(parents=True)
    for spk in ("ann", "bob"):
        sf.write(tmp_path / "val" / "0" / f"0_{spk}_9.wav", clip(300.0, 8000, 0.3, rng), 8000)
    AudioFolderDataModule(root=str(tmp_path), group_regex=r"^(\d+)_", **kw).prepare()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "val shares its dataset.group_regex groups with train (0)" in text
    assert "test's (8, 9) are all new" in text
    with pytest.raises(TLError, match="group_regex.*exactly one group"):
        AudioFolderDataModule(root=str(tmp_path), group_regex=r"^(\d)_(\w)", **kw)
    (tmp_path / "test" / "8" / "odd.wav").write_bytes((tmp_path / "val/0/0_ann_9.wav").read_bytes())
    with pytest.raises(TLError, match=r"odd.wav: file name does not match dataset"):
        AudioFolderDataModule(root=str(tmp_path), group_regex=r"^(\d+)_", **kw).prepare()
