"""The data pipeline (fastlearn/loader.py): workers that persist, the same batches as fastai's loader, CPU quota,
the decoded-image cache, GPU decoding's switch, pinned non-blocking copies (CUDA only)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastlearn.data.dls import image_dls
from fastlearn.data.loader import EncodedImages, PersistentDL, ReadEncoded, cache_budget, check_decode, collate_encoded, cpu_quota, decode_image, decode_jpegs_on, image_cache_for, usable_cpus
from fastlearn.core.recipes import Recipe


def _batches(dl, epochs):
    return [[(x.clone(), y.clone()) for x, y in dl] for _ in range(epochs)]


def _same(a, b):
    return len(a) == len(b) and all(len(ea) == len(eb) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                                               for (xa, ya), (xb, yb) in zip(ea, eb))
                                    for ea, eb in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_workers_give_fastais_batches_and_start_once(image_folder, workers):
    "Same seed: the same augmented batches, epoch after epoch, as fastai's own loader; workers forked once."
    def dls():
        return image_dls(image_folder, size=24, bs=8, seed=0, num_workers=workers, cache_images=False)
    ours = dls()
    assert isinstance(ours.train, PersistentDL)
    torch.manual_seed(0)
    got = _batches(ours.train, 3)
    ref = dls()
    ref.train.persistent = False  # fastai's DataLoader.__iter__: new workers every epoch
    torch.manual_seed(0)
    want = _batches(ref.train, 3)
    assert _same(got, want)
    assert ours.train.worker_starts == workers  # once for three epochs (fastai: 3 x workers)
    ours.train.close(); ref.train.close()


def test_a_stopped_epoch_leaves_the_workers_ready(image_folder):
    dls = image_dls(image_folder, size=24, bs=8, seed=0, num_workers=2, cache_images=False)
    it = iter(dls.train)
    next(it)
    it.close()  # the consumer stops early (an exception in the training step, a cancelled epoch)
    n = sum(1 for _ in dls.train)
    assert n == len(dls.train) and dls.train.worker_starts == 2
    dls.train.close()


def test_cpu_quota_caps_the_affinity_count():
    assert cpu_quota("200000 100000") == 2.0
    assert cpu_quota("max 100000") is None and cpu_quota(None) is None and cpu_quota("junk") is None
    assert usable_cpus(64, "150000 100000") == 2   # rounded up
    assert usable_cpus(4, "800000 100000") == 4    # the affinity mask is the smaller
    assert usable_cpus(8, None) == 8


def test_cache_budget_rules():
    gb = 1 << 30
    assert cache_budget(False, 10, 16 * gb) == 0
    assert cache_budget(True, 10 * gb, 16 * gb) == 8 * gb
    assert cache_budget("auto", gb, 16 * gb) == 2 * gb        # fits in min(2 GB, 25% RAM)
    assert cache_budget("auto", 3 * gb, 16 * gb) == 0         # does not: decode each time
    with pytest.raises(ValueError, match="cache_images='yes'"):
        cache_budget("yes", 0, gb)


def _jpeg(path, w=120, h=80, seed=0):
    a = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=90)
    return path


def test_decode_image_reduces_the_shorter_side_never_upscales(tmp_path):
    f = _jpeg(tmp_path / "a.jpg")
    assert decode_image(f, 40).size == (60, 40)
    assert decode_image(f, 200).size == (120, 80)
    assert decode_image(f).mode == "RGB"


def test_cache_changes_the_time_not_the_pixels(image_folder):
    cached = image_dls(image_folder, size=24, bs=8, seed=0, num_workers=0, cache_images=True)
    plain = image_dls(image_folder, size=24, bs=8, seed=0, num_workers=0, cache_images=False)
    assert cached.image_cache is not None and plain.image_cache is None
    torch.manual_seed(0)
    a = _batches(cached.valid, 1)
    torch.manual_seed(0)
    b = _batches(plain.valid, 1)
    assert _same(a, b) and len(cached.image_cache) == len(cached.folder_report.files)
    assert image_cache_for([], 24) is None


def test_gpu_decode_is_a_recipe_switch_that_needs_cuda(image_folder):
    assert Recipe(decode="cuda").decode == "cuda"
    with pytest.raises(ValueError, match="decode"):
        Recipe(decode="gpu")
    with pytest.raises(ValueError, match="decode='bogus'"):
        check_decode("bogus")
    check_decode("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available; use decode='cpu'"):
            check_decode("cuda")
        with pytest.raises(ValueError, match="decode='cuda'"):
            image_dls(image_folder, size=24, bs=8, num_workers=0, decode="cuda")


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decode_pipeline_runs_with_the_cpu_decoder(tmp_path, monkeypatch, workers):
    "image_dls(decode='cuda') end to end, nvJPEG's place taken by torchvision's CPU decoder (no CUDA here)."
    import fastlearn.data.loader as loader
    for split in ("train", "valid"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                _jpeg(tmp_path / split / c / f"{i}.jpg", w=100 + 4 * i, h=80, seed=i)
    monkeypatch.setattr(loader, "check_decode", lambda *a, **k: None)
    dls = image_dls(tmp_path, size=32, bs=4, num_workers=workers, device="cpu", decode="cuda")
    for dl in (dls.train, dls.valid):
        x, y = next(iter(dl))
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and len(y) == 4
    dls.train.close()


def test_gpu_decode_pieces_on_the_cpu(tmp_path):
    "The bytes reader, the collation and the batched decode + resize + crop (run here with the CPU decoder)."
    files = [_jpeg(tmp_path / f"{i}.jpg", w=120 + 8 * i, h=80, seed=i) for i in range(3)]
    enc = [ReadEncoded()(f) for f in files]
    assert all(isinstance(e, EncodedImages) and e.data.dtype == torch.uint8 for e in enc)
    xb, yb = collate_encoded([(e, torch.tensor(i)) for i, e in enumerate(enc)])
    assert isinstance(xb, EncodedImages) and xb.sizes == [f.stat().st_size for f in files]
    assert torch.equal(yb, torch.arange(3))
    out = decode_jpegs_on(xb.split(), 32, "cpu")
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    ref = np.asarray(decode_image(files[0], 32))  # Pillow's decode at the same size, centre crop
    top, left = (ref.shape[0] - 32) // 2, (ref.shape[1] - 32) // 2
    diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - ref[top:top + 32, left:left + 32].astype(int))
    assert diff.mean() < 12  # same image, different JPEG decoders and resamplers


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_cuda_batches_are_pinned_copies_equal_to_the_cpu_ones(image_folder):
    gpu = image_dls(image_folder, size=24, bs=8, seed=0, num_workers=2, device="cuda", cache_images=False)
    cpu = image_dls(image_folder, size=24, bs=8, seed=0, num_workers=2, device="cpu", cache_images=False)
    assert gpu.train.pin_memory
    torch.manual_seed(0)
    g = _batches(gpu.valid, 1)
    torch.manual_seed(0)
    c = _batches(cpu.valid, 1)
    assert all(xg.device.type == "cuda" and torch.allclose(xg.cpu(), xc, atol=1e-6) for (xg, _), (xc, _) in zip(g[0], c[0]))
    gpu.train.close(); cpu.train.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_gpu_decode_gives_a_uint8_batch_on_the_device(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "valid" / c).mkdir(parents=True)
        for i in range(8):
            _jpeg(tmp_path / "train" / c / f"{i}.jpg", seed=i)
            _jpeg(tmp_path / "valid" / c / f"{i}.jpg", seed=10 + i)
    dls = image_dls(tmp_path, size=32, bs=4, num_workers=0, device="cuda", decode="cuda")
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 32, 32) and x.device.type == "cuda" and x.dtype == torch.float32
