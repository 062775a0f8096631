"""Try each kind of bad input on the command line and print a markdown table of what fastlearn said.

    python tools/bad_inputs.py
"""
import io, os, sys, contextlib, shutil
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch; torch.set_num_threads(1)
from PIL import Image
from conftest import write_image_folder
from fastlearn.cli import main
import tempfile
root = tempfile.mkdtemp(prefix="fastlearn-bad-inputs-")
def folder(name, **kw):
    return write_image_folder(f"{root}/{name}", n_per_class=8, valid=2, **kw)
cases = []
cases.append(("missing data folder", ["train", "digits", "--data", f"{root}/nope"]))
os.makedirs(f"{root}/empty"); cases.append(("empty data folder", ["train", "digits", "--data", f"{root}/empty"]))
d = folder("emptyclass"); [f.unlink() for f in (d / "train" / "b").iterdir()]
cases.append(("empty class folder", ["train", "digits", "--data", str(d)]))
d = folder("oneclass", classes=("a",)); cases.append(("one class only", ["train", "digits", "--data", str(d)]))
d = folder("corrupt"); (d/"train/a/bad.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage"); (d/"train/b/zero.jpg").write_bytes(b"")
data = open(d/"train/c/0.png","rb").read(); (d/"train/c/trunc.png").write_bytes(data[: len(data)//2])
cases.append(("corrupt, zero-byte and truncated images", ["train", "digits", "--data", str(d)]))
cases.append(("same, with bad_images=skip (trains)", None))
d = folder("ok")
cases.append(("unknown recipe", ["train", "digitz", "--data", str(d)]))
cases.append(("unknown recipe key", ["train", "digits", "--data", str(d), "epoch=3"]))
cases.append(("negative LR", ["train", "digits", "--data", str(d), "lr=-0.01"]))
cases.append(("pct_start outside (0, 1)", ["train", "digits", "--data", str(d), "pct_start=1.2"]))
cases.append(("final size smaller than start size", ["train", "digits", "--data", str(d), "size=64", "resize_start=128"]))
cases.append(("unknown architecture", ["train", "digits", "--data", str(d), "arch=efficientnet_b9"]))
cases.append(("bf16 asked on a CPU", ["train", "digits", "--data", str(d), "precision=bf16"]))
os.makedirs(f"{root}/run"); open(f"{root}/run/model.safetensors","w").write("previous run")
cases.append(("run folder already holds a run", ["train", "digits", "--data", str(d), "--run-dir", f"{root}/run"]))
cases.append(("--resume without a checkpoint", ["train", "digits", "--data", str(d), "--run-dir", f"{root}/run", "--resume", "bs=8"]))
print("| bad input | exit | message |\n|---|---|---|")
for name, args in cases:
    if args is None:
        continue
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args + ["--out", f"{root}/runs"])
        except SystemExit as e:
            code = e.code
    msg = err.getvalue().strip().replace("|", "\\|").replace(root, "…")
    print(f"| {name} | {code} | {msg[:400]} |")
print("previous run file intact:", open(f"{root}/run/model.safetensors").read() == "previous run")
print("runs written:", os.listdir(f"{root}/runs") if os.path.exists(f"{root}/runs") else [])
# more classes than outputs: python API
from fastlearn import image_dls, transfer_learner
try:
    transfer_learner(image_dls(str(d), size=32, bs=8), "test_resnet", pretrained=False, n_out=2, progress=False)
except Exception as e:
    print(f"| more classes than outputs (n_out=2, 3 classes) | {type(e).__name__} | {e} |")
# mixed modes converted
m = folder("modes")
Image.new("L", (32, 32), 80).save(m/"train/a/gray.png"); Image.new("RGBA", (32, 32), (1,2,3,4)).save(m/"train/a/rgba.png")
Image.new("CMYK", (32, 32), (1,2,3,4)).save(m/"train/a/cmyk.jpg"); Image.new("P", (32,32)).save(m/"train/a/pal.png")
dls = image_dls(str(m), size=32, bs=8)
print("| grayscale/RGBA/CMYK/palette mixed in | converted | batch", tuple(dls.one_batch()[0].shape), "|")
