"""A data pipeline that keeps up: DataLoader workers that live for the whole run, pinned batches copied without
waiting, and a RAM cache of decoded images.

- `PersistentDL`: fastai's loader forks its workers again every epoch (costly for a large training process); here
  they start once per loader and receive each epoch's sample order and seed, so the batches, the random item
  transforms and the main process's RNG draws are fastai's own (tests check it batch by batch).
- `ImageDecoder` / `ImageCache`: each image decoded once at the size the run needs and kept in RAM as uint8 within a
  budget; the decoder is the same with or without the cache, so the cache changes the time, never the pixels.
  Workers fork after the cache is filled and share its pages (copy-on-write); under spawn each decodes for itself.
- `usable_cpus`: the CPUs a process may use, from its affinity mask and the cgroup CPU quota (in a container
  `sched_getaffinity` reports the host's cores).
"""
from __future__ import annotations

import math
import os
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory pickling of tensors for the queues)
import torch.nn.functional as F
from fastai.data.block import TransformBlock
from fastai.data.core import TfmdDL
from fastai.data.load import _loaders, fa_collate
from fastai.data.transforms import IntToFloatTensor
from fastai.torch_core import set_num_threads, set_seed, TensorImage, to_device
from fastai.vision.core import PILImage
from fasttransform import Transform
from PIL import Image
from torch.utils.data._utils import ExceptionWrapper
from torch.utils.data._utils.pin_memory import pin_memory
from torchvision.io import decode_jpeg, ImageReadMode

__all__ = ["PersistentDL", "ImageDecoder", "DECODERS", "check_decode", "EncodedImages", "ReadEncoded", "GpuDecode",
           "decode_jpegs_on", "collate_encoded", "gpu_decode_block", "ImageCache", "image_cache_for", "decode_image",
           "cache_budget", "usable_cpus", "cpu_quota", "read_cpu_max", "memory_limit", "estimate_cache_bytes"]

CACHE_SETTINGS = ("auto", True, False)
_AUTO_CACHE_MAX = 2 << 30  # bytes: "auto" caches when the images fit in min(2 GB, 25% of RAM)


# -- CPUs -------------------------------------------------------------------------------------------------------

def cpu_quota(cpu_max: str | None) -> float | None:
    "CPUs a cgroup quota allows, from cgroup v2 `cpu.max` text ('200000 100000' -> 2.0; 'max 100000' -> None)."
    parts = (cpu_max or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(affinity: int, cpu_max: str | None) -> int:
    "CPUs this process can keep busy: its affinity count, capped by the cgroup quota (rounded up, at least 1)."
    q = cpu_quota(cpu_max)
    return max(1, min(affinity, math.ceil(q)) if q is not None else affinity)


def read_cpu_max(root: str = "/sys/fs/cgroup") -> str | None:
    "The cgroup CPU quota as v2 `cpu.max` text (cgroup v1's cfs quota and period are translated); None if none."
    try:
        return Path(root, "cpu.max").read_text().strip()
    except OSError:
        pass
    try:
        quota = Path(root, "cpu", "cpu.cfs_quota_us").read_text().strip()
        period = Path(root, "cpu", "cpu.cfs_period_us").read_text().strip()
        return f"{'max' if quota.startswith('-') else quota} {period}"
    except OSError:
        return None


def memory_limit(root: str = "/sys/fs/cgroup") -> int:
    "Bytes of RAM this process may use: physical memory, capped by the cgroup's memory limit."
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    for f in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = Path(root, f).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


# -- decoding and the image cache -------------------------------------------------------------------------------

def decode_image(path, short_side: int | None = None) -> Image.Image:
    """The image at `path`, loaded, in mode L or RGB (others converted to RGB, as fastai's `PILImage.create` does), its
    shorter side reduced to `short_side` px (`reduce_short_side`). JPEGs are decoded at the smallest DCT scale (1/2,
    1/4, 1/8) that keeps both sides >= `short_side`, which is faster than a full decode."""
    with Image.open(path) as im:
        if short_side and im.format == "JPEG":
            im.draft("RGB", (short_side, short_side))
        im.load()
        im = im._new(im.im)  # detach from the file, as fastai's load_image does
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return reduce_short_side(im, short_side)


def reduce_short_side(im: Image.Image, short_side: int | None) -> Image.Image:
    "`im` with its shorter side reduced to `short_side` px when larger (bilinear, antialiased); never upscaled."
    w, h = im.size
    if short_side and min(w, h) > short_side:
        size = (short_side, round(h * short_side / w)) if w <= h else (round(w * short_side / h), short_side)
        im = im.resize(size, Image.Resampling.BILINEAR)
    return im


def _image_bytes(path, short_side: int | None) -> int:
    "Bytes the decoded, reduced image takes in the cache, from its header only (no decode)."
    with Image.open(path) as im:
        w, h = im.size
        channels = 1 if im.mode == "L" else 3  # decode_image keeps L, turns every other mode into RGB
    s = min(w, h)
    if short_side and s > short_side:
        w, h = round(w * short_side / s), round(h * short_side / s)
    return w * h * channels


def estimate_cache_bytes(files: Sequence, short_side: int | None, sample: int = 64, seed: int = 0) -> int:
    "Bytes the cache would hold for `files`: the mean over a seeded sample of image headers, times their number."
    if not files:
        return 0
    pick = files if len(files) <= sample else random.Random(seed).sample(list(files), sample)
    sizes = []
    for f in pick:
        try:
            sizes.append(_image_bytes(f, short_side))
        except OSError:
            continue
    return int(np.mean(sizes) * len(files)) if sizes else 0


def cache_budget(setting, estimated: int, ram: int) -> int:
    """Bytes the image cache may hold (0: no cache). "auto": all of `estimated` when it fits in min(2 GB, 25% of
    `ram`), else 0; True: up to half of `ram` (images past it are decoded each time); False: 0."""
    if setting not in CACHE_SETTINGS:
        raise ValueError(f"cache_images={setting!r}; use 'auto', true or false")
    if setting is False:
        return 0
    if setting is True:
        return ram // 2
    cap = min(_AUTO_CACHE_MAX, ram // 4)
    return cap if estimated <= cap else 0


class ImageCache:
    "Decoded images (`decode_image` at `short_side`) as read-only uint8 arrays in RAM, at most `max_bytes` of them."

    def __init__(self, files: Sequence, short_side: int | None, max_bytes: int, threads: int | None = None):
        self.files, self.short_side, self.max_bytes = list(files), short_side, max_bytes
        self.threads = threads or max(1, min(8, usable_cpus(len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else (os.cpu_count() or 1), read_cpu_max())))
        self.arrays: dict[str, np.ndarray] = {}
        self.nbytes, self.filled = 0, False
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.arrays)

    def _keep(self, key: str, im: Image.Image) -> None:
        a = np.asarray(im)
        with self._lock:
            if key in self.arrays or self.nbytes + a.nbytes > self.max_bytes:
                return
            a.setflags(write=False)
            self.arrays[key] = a
            self.nbytes += a.nbytes

    def get(self, path) -> Image.Image:
        "The decoded image (mode L or RGB): from RAM, or decoded now and kept while the budget allows."
        key = str(path)
        a = self.arrays.get(key)
        if a is not None:
            return Image.fromarray(a)
        im = decode_image(path, self.short_side)
        self._keep(key, im)
        return im

    def fill(self) -> None:
        "Decode every file not cached yet, in a thread pool (Pillow releases the GIL), until the budget is spent."
        if self.filled:
            return
        todo = [f for f in self.files if str(f) not in self.arrays]

        def one(f):
            if self.nbytes < self.max_bytes:
                try:
                    self._keep(str(f), decode_image(f, self.short_side))
                except OSError:
                    pass  # left to the loader, which reports it the way it reports any bad file
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            list(pool.map(one, todo))
        self.filled = True

    def __getstate__(self):  # pickled (e.g. to spawned workers): the images stay behind
        return {**self.__dict__, "arrays": {}, "nbytes": 0, "filled": False, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def image_cache_for(files: Sequence, short_side: int | None, setting="auto", ram: int | None = None) -> ImageCache | None:
    "An `ImageCache` for `files` with the budget `cache_budget` gives `setting` on this machine; None when off."
    if setting not in CACHE_SETTINGS:
        raise ValueError(f"cache_images={setting!r}; use 'auto', true or false")
    if setting is False or not files:
        return None
    est = estimate_cache_bytes(files, short_side) if setting == "auto" else 0
    budget = cache_budget(setting, est, memory_limit() if ram is None else ram)
    return ImageCache(files, short_side, budget) if budget else None


class ImageDecoder(Transform):
    "Type transform: an image file to fastai's `PILImage` (RGB), through `decode_image` and the cache if any."

    def __init__(self, short_side: int | None = None, cache: ImageCache | None = None):
        super().__init__()
        self.short_side, self.cache = short_side, cache

    def encodes(self, fn: Path | str):
        im = self.cache.get(fn) if self.cache is not None else decode_image(fn, self.short_side)
        return PILImage.create(im if im.mode == "RGB" else im.convert("RGB"))

    def __getstate__(self):  # an exported learner must not carry the cached images
        return {**self.__dict__, "cache": None}


# -- decoding on the GPU ------------------------------------------------------------------------------------------

DECODERS = ("cpu", "cuda")


def check_decode(decode: str, device=None) -> None:
    "Refuses `decode` values other than 'cpu'/'cuda', and 'cuda' where the loader's device is not a CUDA GPU."
    if decode not in DECODERS:
        raise ValueError(f"decode={decode!r}; use 'cpu' (Pillow in the DataLoader workers) or 'cuda' (nvJPEG)")
    if decode == "cuda":
        dev = torch.device(device) if device is not None else None
        if not torch.cuda.is_available() or (dev is not None and dev.type != "cuda"):
            raise ValueError(f"decode='cuda' decodes JPEGs on the GPU (torchvision.io.decode_jpeg) but "
                             f"{'no CUDA device is available' if not torch.cuda.is_available() else f'the device is {dev}'}; "
                             f"use decode='cpu' (the default)")


class EncodedImages:
    """Encoded image files, their bytes end to end in one uint8 CPU tensor (`sizes`: bytes of each): one item, or a
    batch of them. Not a tensor, so fastai's collation and device copies leave it alone; a batch crosses from the
    worker in one shared-memory block."""
    __slots__ = ("data", "sizes")

    def __init__(self, data: torch.Tensor, sizes: list[int]):
        self.data, self.sizes = data, sizes

    def split(self) -> list[torch.Tensor]:
        return list(torch.split(self.data, self.sizes))


class ReadEncoded(Transform):
    "Type transform for GPU decoding: an image file to its bytes (the worker only reads the file)."

    def encodes(self, fn: Path | str) -> EncodedImages:
        b = Path(fn).read_bytes()
        return EncodedImages(torch.frombuffer(bytearray(b), dtype=torch.uint8), [len(b)])


def collate_encoded(samples):
    "fastai's collation, except that the `EncodedImages` of a batch are joined into one (the images differ in size)."
    if isinstance(samples[0], tuple) and any(isinstance(o, EncodedImages) for o in samples[0]):
        return tuple(EncodedImages(torch.cat([o.data for o in c]), [n for o in c for n in o.sizes])
                     if isinstance(c[0], EncodedImages) else fa_collate(c) for c in zip(*samples))
    return fa_collate(samples)


def decode_jpegs_on(encoded: Sequence[torch.Tensor], size: int, device, random_crop: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A uint8 batch (N, 3, size, size) on `device` from JPEG bytes: decoded there in one nvJPEG call, the shorter
    side resized to `size` (antialiased bilinear), then a `size` crop: centred, or at a random place (training)."""
    imgs = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    out = torch.empty(len(imgs), 3, size, size, dtype=torch.uint8, device=device)
    for i, im in enumerate(imgs):
        h, w = im.shape[-2:]
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        im = F.interpolate(im[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        if random_crop:
            top = int(torch.randint(0, nh - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, nw - size + 1, (1,), generator=generator))
        else:
            top, left = (nh - size) // 2, (nw - size) // 2
        out[i] = im[0, :, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)
    return out


class GpuDecode(Transform):
    """Batch transform (first in `after_batch`): a batch of `EncodedImages` decoded on the loader's CUDA device into
    fastai's `TensorImage` uint8 batch at `size` (random crop on train, centre crop on valid, as fastai's `Resize`)."""
    order = 0  # before IntToFloatTensor (10) and the batch augmentation

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def setups(self, dl):
        self.device = dl.device

    def encodes(self, b: EncodedImages):
        dev = getattr(self, "device", None) or torch.device("cuda")
        return TensorImage(decode_jpegs_on(b.split(), self.size, dev, random_crop=self._train))

    def __call__(self, b, split_idx=None, **kwargs):
        self._train = split_idx == 0  # the pipeline's split: 0 is the training loader
        return super().__call__(b, split_idx=split_idx, **kwargs)


def gpu_decode_block(decode: str, device, size: int, rand_augment=None):
    """`image_dls`'s pieces for `decode='cuda'`: the image block (file bytes, decoded by `GpuDecode`), its item
    transforms (none: `GpuDecode` resizes and crops) and the DataLoader arguments (the collation)."""
    check_decode(decode, device)
    if rand_augment is not None:
        raise ValueError(f"rand_augment={rand_augment!r} works on decoded images in the workers, so it needs "
                         f"decode='cpu'; drop one of them")
    block = TransformBlock(type_tfms=ReadEncoded(), batch_tfms=[GpuDecode(size), IntToFloatTensor])
    return block, [], {"create_batch": collate_encoded}


# -- persistent workers ------------------------------------------------------------------------------------------

_END = "__fastlearn_end_of_epoch__"


def _terminal(b) -> bool:
    "A worker's last message of an epoch: its end marker, or the exception that stopped it."
    return isinstance(b, ExceptionWrapper) or (isinstance(b, str) and b == _END)


def _worker_loop(dl, wid: int, n: int, tasks, out, current) -> None:
    "A worker: for each epoch's (id, sample order, base seed), what fastai's worker does for one epoch."
    set_num_threads(1)
    dl.num_workers, dl.offs = n, wid  # fastai's _wif: this worker's share of the batches
    while True:
        task = tasks.get()
        if task is None:
            return
        eid, idxs, base_seed = task
        try:
            set_seed(base_seed + wid)  # torch seeds a worker with base_seed + id; fastai's _wif then set_seed()s it
            dl.wif()
            dl._DataLoader__idxs = idxs
            for b in dl.create_batches(dl.sample()):
                if current.value != eid:  # the main process abandoned this epoch
                    break
                out.put((eid, b))
            out.put((eid, _END))
        except Exception:  # noqa: BLE001 - re-raised in the main process, as torch's workers do
            out.put((eid, ExceptionWrapper(where=f"in fastlearn DataLoader worker process {wid}")))


class _WorkerPool:
    "The worker processes of one `PersistentDL`, started once; each epoch is a task they all receive."

    def __init__(self, dl, n: int, prefetch: int = 2):
        ctx = dl.fake_l.multiprocessing_context
        ctx = ctx.get_context() if hasattr(ctx, "get_context") else ctx
        self.n, self.epoch, self.open_epoch, self.pid = n, 0, None, os.getpid()
        self.current = ctx.Value("q", 0, lock=False)
        self.tasks = [ctx.SimpleQueue() for _ in range(n)]
        self.outs = [ctx.Queue(maxsize=prefetch) for _ in range(n)]
        self.procs = [ctx.Process(target=_worker_loop, args=(dl, w, n, self.tasks[w], self.outs[w], self.current),
                                  daemon=True) for w in range(n)]
        for p in self.procs:
            p.start()

    def _get(self, w: int, timeout: float):
        "The next result of worker `w`; raises if the worker died."
        while True:
            try:
                return self.outs[w].get(timeout=5.0 if not timeout else min(timeout, 5.0))
            except queue.Empty:
                p = self.procs[w]
                if not p.is_alive():
                    raise RuntimeError(f"DataLoader worker (pid {p.pid}) exited unexpectedly with exit code "
                                       f"{p.exitcode}; out of memory or killed?") from None
                if timeout:
                    raise RuntimeError(f"DataLoader timed out after {timeout} seconds") from None

    def _drain(self, timeout: float) -> None:
        "Wait out an abandoned epoch: read each worker's queue up to its end marker."
        eid, self.open_epoch = self.open_epoch, None
        if eid is None:
            return
        for w in range(self.n):
            while True:
                e, b = self._get(w, timeout)
                if e == eid and _terminal(b):
                    break

    def start_epoch(self, idxs, base_seed: int, timeout: float) -> int:
        self._drain(timeout)
        self.epoch += 1
        self.current.value = self.epoch
        for t in self.tasks:
            t.put((self.epoch, idxs, base_seed))
        self.open_epoch = self.epoch
        return self.epoch

    def batches(self, eid: int, timeout: float):
        "This epoch's batches in fastai's order: global batch k comes from worker k % n."
        k, ended = 0, set()
        while True:
            w = k % self.n
            e, b = self._get(w, timeout)
            if e != eid:
                continue  # left over from an abandoned epoch
            if _terminal(b):
                ended.add(w)
                self._finish(eid, ended, timeout)
                if isinstance(b, ExceptionWrapper):
                    b.reraise()
                return
            yield b
            k += 1

    def _finish(self, eid: int, ended: set, timeout: float) -> None:
        "The epoch is over: read the other workers' end markers, so the queues start the next epoch empty."
        self.current.value = -eid  # workers still producing (after an error) stop
        for w in range(self.n):
            while w not in ended:
                e, b = self._get(w, timeout)
                if e == eid and _terminal(b):
                    ended.add(w)
        self.open_epoch = None

    def abandon(self) -> None:
        self.current.value = -self.epoch  # workers stop at their next batch; start_epoch drains the rest

    def close(self) -> None:
        if os.getpid() != self.pid:  # a forked child's copy of another loader's pool: not its to stop
            return
        for t in self.tasks:
            try:
                t.put(None)
            except (OSError, ValueError):
                pass
        self.current.value = -1
        for q in self.outs:  # unblock workers waiting to put
            try:
                while True:
                    q.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
        self.procs = []


class PersistentDL(TfmdDL):
    """fastai's `TfmdDL` with worker processes that live as long as the loader and, on CUDA, pinned batches copied
    with `non_blocking`; the batches are fastai's. `persistent=False` (the default of `.new()`, e.g. `test_dl`) keeps
    fastai's per-iteration workers. Workers restart when the dataset, batch size or item/collate transforms are
    replaced; a transform changed in place is not seen by running workers."""

    def __init__(self, dataset=None, persistent: bool = True, image_cache: ImageCache | None = None, **kwargs):
        self.persistent, self.image_cache = persistent, image_cache
        self._pool, self._pool_key, self.worker_starts = None, None, 0
        super().__init__(dataset, **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):
        kwargs.setdefault("persistent", False)
        kwargs.setdefault("image_cache", self.image_cache)
        return super().new(dataset, cls, **kwargs)

    def one_batch(self):
        self._peek = True  # one batch: no cache fill, no workers
        try:
            return super().one_batch()
        finally:
            self._peek = False

    def _device_copy(self, b):
        if self.device is None:
            return b
        return to_device(b, self.device, non_blocking=torch.device(self.device).type == "cuda")

    def __iter__(self):
        peek = getattr(self, "_peek", False)
        if self.image_cache is not None and not peek:
            self.image_cache.fill()  # before any worker forks, so workers share the decoded images
        # fastai's DataLoader.__iter__, with non-blocking device copies; live workers get the sample order and seed
        self.randomize()
        self.before_iter()
        self._DataLoader__idxs = idxs = self.get_idxs()
        if self.fake_l.num_workers == 0 or not self.persistent or peek:
            for b in _loaders[self.fake_l.num_workers == 0](self.fake_l):
                if self.pin_memory and type(b) == list:  # noqa: E721 - fastai's test: pinning turns tuples into lists
                    b = tuple(b)
                yield self.after_batch(self._device_copy(b))
        else:
            base_seed = torch.empty((), dtype=torch.int64).random_(generator=self.fake_l.generator).item()
            pool = self._workers()
            batches = pool.batches(pool.start_epoch(idxs, base_seed, self.timeout), self.timeout)
            if self.pin_memory and torch.cuda.is_available():
                batches = _pinned(batches)
            try:
                for b in batches:
                    yield self.after_batch(self._device_copy(b))
            except BaseException:  # the consumer stopped early: workers stop at their next batch, the pin thread ends
                pool.abandon()
                batches.close()
                raise
        self.after_iter()
        if hasattr(self, "it"):
            del self.it

    def _workers(self) -> _WorkerPool:
        "The live pool, (re)started when what the workers hold of this loader has changed."
        key = (id(self.dataset), getattr(self.dataset, "split_idx", None), self.bs, self.drop_last, self.n,
               self.indexed, self.fake_l.num_workers, id(self.after_item), tuple(map(id, self.after_item.fs)),
               id(self.before_batch), tuple(map(id, self.before_batch.fs)))
        if self._pool is None or key != self._pool_key:
            self.close()
            self._pool = _WorkerPool(self, self.fake_l.num_workers)
            self._pool_key = key
            self.worker_starts += self.fake_l.num_workers
        return self._pool

    def close(self) -> None:
        "Stop the worker processes (they also stop with the process, or when the loader is garbage-collected)."
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):  # pickles (an exported learner, spawned workers) carry neither processes nor images
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_pool": None, "_pool_key": None}


def _pinned(batches, depth: int = 2):
    "`batches` pinned by a background thread (the copy releases the GIL), `depth` ahead of the consumer."
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for b in batches:
                pinned = pin_memory(b)
                if not put(tuple(pinned) if isinstance(b, tuple) and isinstance(pinned, list) else pinned):
                    return
            put(sentinel)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while True:
            b = q.get()
            if b is sentinel:
                return
            if isinstance(b, BaseException):
                raise b
            yield b
    finally:
        stop.set()
        t.join()  # it ends at its next batch or end marker (the workers of an abandoned epoch stop soon)
