"""The build behind ``bash build_wheel.sh`` (see --help): OUT/hpa_kernel-<version>-py3-none-any.whl,
OUT/wheelhouse/ (what the Kaggle image lacks: pip's resolution of hpa_kernel's requirements and --deps
without KAGGLE_PROVIDED), OUT/kaggle_dataset/ and OUT/kaggle_kernel/, built in a staging folder and
swapped in. Runs with the interpreter that builds; needs only pip and setuptools (torch to test-load)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip always brings its own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

PROG = "build_wheel.sh"
REPO = Path(__file__).resolve().parent.parent
# What the Kaggle GPU image brings (with everything these need): never carried; they enter pip's
# resolution as empty placeholder wheels, so pip never walks into their dependencies. Everything
# else hpa_kernel, timm and pycocotools need (pyyaml, huggingface_hub and its needs, ...) is
# carried. The one place this list lives (`--print-kaggle-provided` prints it).
KAGGLE_PROVIDED = ("torch", "torchvision", "torchaudio", "numpy", "pandas", "scipy", "scikit-image",
                   "opencv-python", "opencv-python-headless", "opencv-contrib-python", "joblib", "tqdm", "pillow")
FORBIDDEN_DEPS = ("torch", "torchvision", "torchaudio")
SRC_PATHS = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "hpa_kernel")
PLACEHOLDER = "kaggle.image"  # the local version label of the placeholder wheels
SLUG = "OWNER/slug (slug: {}-50 lowercase letters, digits, '-')"
RULES = {"python": (r"3\.[0-9]+(,3\.[0-9]+)*", "X.Y or a list X.Y,X.Z (e.g. 3.10,3.11)"),  # option -> (pattern, what)
         "dataset_id": (r"[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]{1,48}[a-z0-9]", SLUG.format(3)),
         "kernel_id": (r"[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]{3,48}[a-z0-9]", SLUG.format(5))}
EPILOG = """\
The wheel is built offline with the building Python's setuptools when it can make wheels (>= 70.1,
or the `wheel` package), else in pip's isolated environment (from the index; with --no-wheelhouse
the build stops and says what to install). Environment: PYTHON = interpreter that builds (default
python3); SOURCE_DATE_EPOCH (default: time of the last git commit) fixes the wheel's timestamps."""


class BuildError(Exception):
    """Stops the build; printed as one `build_wheel.sh: error: ...` line."""


logger = logging.getLogger(PROG)  # one line a message, "build_wheel.sh: ..." (main sets the handler)
log = logger.info


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Options:  # the parsed, checked command line
    out: Path
    weights: Path
    python: list[str]
    platform: list[str]  # every manylinux tag up to --platform (pip takes tags literally)
    arch: str
    deps: list[str] | None  # None: the defaults (hpa_kernel's requirements the image lacks)
    wheelhouse: bool
    weights_check: bool
    dataset_id: str
    title: str
    license: str
    kernel_id: str
    extra_dataset: list[str]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # the script's own one-line messages
        m = re.match(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
        if m:
            raise BuildError(f"{m.group(1)} needs a value (see --help)")
        m = re.match(r"unrecognized arguments: (\S+)", message)
        raise BuildError(f"unknown argument '{m.group(1)}' (see --help)" if m else message)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="bash build_wheel.sh", allow_abbrev=False, epilog=EPILOG,
                 formatter_class=argparse.RawDescriptionHelpFormatter, description="Builds the hpa_kernel wheel, "
                 "a wheelhouse of runtime dependencies and the Kaggle dataset and kernel folders.")
    add = ap.add_argument
    add("--out", default=str(REPO / "dist"), metavar="DIR", help="output folder (default: <repo>/dist)")
    add("--python", default="3.10,3.11,3.12", metavar="X.Y[,X.Z]", help="the Kaggle image's Python (%(default)s)")
    add("--platform", default="manylinux_2_28_x86_64", metavar="TAG", help="its newest platform tag (%(default)s)")
    add("--deps", metavar='"A B==1.0"', help="wheelhouse requirements replacing the default (hpa_kernel's that the "
        "image lacks, pinned as installed here); named packages of the image are carried; torch* are refused")
    add("--no-wheelhouse", "--offline", dest="wheelhouse", action="store_false", help="download nothing")
    add("--weights", default=str(REPO / "weights"), metavar="DIR", help="weights folder with manifest.json")
    add("--no-weights-check", dest="weights_check", action="store_false", help="do not check the weights against "
        "the manifest nor test-load its classifiers (which needs torch and timm here)")
    add("--dataset-id", default="USERNAME/hpa-kernel", metavar="ID", help="Kaggle dataset id (default %(default)s)")
    add("--title", default="hpa-kernel wheel and weights", help="dataset title, 6-50 characters")
    add("--license", default="other", metavar="NAME", help="dataset license name (default %(default)s)")
    add("--kernel-id", metavar="ID", help="Kaggle kernel id (default <dataset owner>/hpa-kernel-submit)")
    add("--extra-dataset", action="append", default=[], metavar="ID", help="another dataset the kernel attaches")
    add("--print-kaggle-provided", action="store_true", help="print the packages the Kaggle image brings and exit")
    return ap


def platform_tags(platform: str) -> tuple[str, list[str]]:
    """The architecture and every manylinux tag up to ``platform``, newest first."""
    m = re.fullmatch(r"(manylinux_2_(\d+)|manylinux2014|manylinux2010|manylinux1)_([a-z0-9_]+)", platform)
    if not m:
        raise BuildError("--platform wants a manylinux tag such as manylinux_2_28_x86_64 or manylinux2014_x86_64, "
                         f"not '{platform}'")
    glibc, arch = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}.get(m[1]) or int(m[2]), m[3]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    tags += [f"{legacy}_{arch}" for legacy, minor in (("manylinux2014", 17), ("manylinux2010", 12)) if glibc >= minor]
    return arch, tags + [f"manylinux1_{arch}"]


def parse_options(args: argparse.Namespace) -> Options:
    del args.print_kaggle_provided
    args.kernel_id = args.kernel_id or args.dataset_id.split("/")[0] + "/hpa-kernel-submit"
    for opt, value in vars(args).items():
        if opt != "deps" and (value == "" or (isinstance(value, list) and "" in value)):
            raise BuildError(f"--{opt.replace('_', '-')} needs a value (see --help)")
    for opt, (pattern, what) in RULES.items():
        if not re.fullmatch(pattern, getattr(args, opt)):
            raise BuildError(f"--{opt.replace('_', '-')} wants {what}, not '{getattr(args, opt)}'")
    for src in args.extra_dataset:
        if not re.fullmatch(r"[A-Za-z0-9_-]+/[A-Za-z0-9_-]+", src):
            raise BuildError(f"--extra-dataset wants OWNER/slug, not '{src}'")
    if not 6 <= len(args.title) <= 50:
        raise BuildError(f"--title must have 6 to 50 characters (Kaggle's rule), not {len(args.title)}")
    args.arch, args.platform = platform_tags(args.platform)
    args.python = args.python.split(",")
    args.deps = None if args.deps is None else args.deps.replace(",", " ").split()
    for req in args.deps or []:  # refused before anything slow runs
        base = norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])
        if base in FORBIDDEN_DEPS:
            raise BuildError(f"--deps must not name {base}: the Kaggle image brings its own CUDA build")
    weights = Path(args.weights)
    if not weights.is_dir():
        raise BuildError(f"weights folder '{weights}' not found (use --weights DIR)")
    if not (weights / "manifest.json").is_file():
        raise BuildError(f"{weights.resolve()}/manifest.json not found: the kernel runs --weights "
                         "<dataset>/weights/manifest.json (use --weights DIR)")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError:
        raise BuildError(f"cannot create output folder '{args.out}'") from None
    args.out, args.weights = Path(args.out).resolve(), weights.resolve()
    if args.out == Path("/") or args.out == args.weights or args.weights in args.out.parents:
        raise BuildError(f"--out ({args.out}) must be neither / nor inside the weights folder ({args.weights})")
    return Options(**vars(args))


def can_make_wheels(opts: Options) -> bool:
    """False when this setuptools needs pip's isolated build (it makes wheels only with `wheel`)."""
    py = sys.executable
    try:
        version = md.version("setuptools")
    except md.PackageNotFoundError:
        raise BuildError(f"setuptools is needed to build the wheel: {py} -m pip install 'setuptools>=70.1'") from None
    probe = "from setuptools.dist import Distribution; Distribution().get_command_class('bdist_wheel')"
    if subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return True
    why = f"setuptools {version} cannot build wheels without the 'wheel' package"
    if not opts.wheelhouse:
        raise BuildError(f"{why}: {py} -m pip install wheel (or 'setuptools>=70.1'); "
                         "or drop --no-wheelhouse to let pip fetch both")
    log(f"{why}: pip builds in an isolated environment (fetches setuptools and wheel)")
    return False


def snapshot_sources(dest: Path) -> str:
    """Copies what git tracks or would track (no build/, *.egg-info, other developers' stale files:
    concurrent builds never share a build folder); returns the default SOURCE_DATE_EPOCH."""
    git = ["git", "-C", str(REPO)]
    if subprocess.run([*git, "rev-parse", "--is-inside-work-tree"], capture_output=True).returncode == 0:
        names = subprocess.run([*git, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SRC_PATHS],
                               capture_output=True, check=True).stdout.decode().split("\0")
        stamp = subprocess.run([*git, "log", "-1", "--format=%ct"], capture_output=True, text=True).stdout.strip()
    else:  # a copy of the sources outside git
        found = [str(p.relative_to(REPO)) for n in SRC_PATHS for p in [REPO / n, *(REPO / n).rglob("*")]]
        names = [n for n in found if not re.search(r"__pycache__|\.pyc$|\.egg-info", n)]
        stamp = ""
    for name in [n for n in names if n and (REPO / n).is_file()]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    if not (dest / "setup.py").is_file() or not (dest / "hpa_kernel" / "__init__.py").is_file():
        raise BuildError("source snapshot is missing setup.py or hpa_kernel/__init__.py")
    return stamp or "315532800"


def build_wheel(src: Path, dest: Path, isolated: bool) -> Path:
    """``pip wheel --no-deps`` of a source snapshot: offline unless this setuptools cannot make wheels."""
    stamp = snapshot_sources(src)
    env = dict(os.environ, SOURCE_DATE_EPOCH=os.environ.get("SOURCE_DATE_EPOCH") or stamp)
    log(f"building the hpa_kernel wheel (SOURCE_DATE_EPOCH={env['SOURCE_DATE_EPOCH']})")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(dest), "."]
    if isolated:
        cmd.insert(5, "--use-pep517")  # older pips would run setup.py bdist_wheel here
    else:
        cmd[5:5] = ["--no-build-isolation", "--no-index"]
        env["PIP_NO_INDEX"] = "1"
    r = subprocess.run(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print("\n".join(r.stdout.splitlines()[-40:]), file=sys.stderr)
        offline = f"; offline: {sys.executable} -m pip install wheel" if isolated else ""
        raise BuildError(f"building the wheel{' in an isolated environment' * isolated} failed (log above){offline}")
    made = [p.name for p in dest.glob("*.whl")]
    if len(made) != 1 or not re.fullmatch(r"hpa_kernel-[^-]+-py3-none-any\.whl", made[0]):
        raise BuildError(f"expected one hpa_kernel-<version>-py3-none-any.whl, pip made {made}")
    return dest / made[0]


def check_wheel(wheel: Path, src: Path) -> None:
    """The wheel holds every module and data file of the package, and no weights."""
    names = set(zipfile.ZipFile(wheel).namelist())
    files = sorted(p.relative_to(src).as_posix() for p in (src / "hpa_kernel").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    needed = [f for f in files if f.endswith(".py") or f.startswith("hpa_kernel/data/")]
    missing = [f for f in needed if f not in names]
    stray = sorted(n for n in names if n.startswith("weights/") or n.endswith((".pt", ".pth")))
    lines = [f"  not in the wheel: {m}" for m in missing]
    lines += ["  (a subpackage without __init__.py, or a data file outside hpa_kernel/data/?)"] * bool(missing)
    lines += [f"  warning: not in the wheel (package_data covers hpa_kernel/data/ only): {f}"
              for f in files if f not in needed and f not in names]
    lines += [f"  must not be in the wheel: {s}" for s in stray]
    if lines:
        print("\n".join(lines), file=sys.stderr)
    if missing or stray:
        raise BuildError("the wheel is incomplete (see above)")


def requires(wheel: Path) -> list[str]:
    """Requires-Dist of a wheel: for ours, setup.py's install_requires (the one list of them)."""
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info/"
    return md.PathDistribution(zipfile.Path(wheel, dist_info)).requires or []


def default_deps(wheel: Path) -> list[str]:
    """The wheel's requirements the image lacks (timm, pycocotools), pinned to the versions installed here."""
    reqs = [Requirement(r) for r in requires(wheel)]
    reqs = [r for r in reqs if norm(r.name) not in KAGGLE_PROVIDED and not (r.marker and "extra" in str(r.marker))]
    installed = {norm(d.metadata["Name"] or ""): d.version for d in md.distributions()}
    return [f"{r.name}=={installed[norm(r.name)]}" if norm(r.name) in installed else str(r) for r in reqs]


def target_args(python: str, opts: Options) -> list[str]:
    """pip's options for wheels of one Python version of the Kaggle image."""
    platforms = [a for tag in opts.platform for a in ("--platform", tag)]
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platforms]


def pip(args: list[str], what: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print("\n".join(r.stdout.splitlines()[-30:]), file=sys.stderr)
        raise BuildError(f"{what} failed (log above); without network use --no-wheelhouse")
    return r.stdout


def write_placeholders(names: list[str], folder: Path, target: list[str]) -> None:
    """Empty wheels for the packages the image brings, in the version installed here (its stand-in),
    else in every version the index has for the ``target``: pip resolves them like any other, but
    never downloads them nor walks into their dependencies."""
    folder.mkdir()
    for name in names:
        try:
            versions = [md.version(name)]
        except md.PackageNotFoundError:
            listed = pip(["index", "versions", name, *target], f"pip index versions {name}")
            versions = ", ".join(re.findall(r"^Available versions: (.*)$", listed, re.M)[:1]).split(", ")
        for v in filter(None, versions):
            v += ("." if "+" in v else "+") + PLACEHOLDER  # sorts after the release itself
            dist = f"{name.replace('-', '_')}-{v}"
            with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
                z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {v}\n")
                z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
                z.writestr(f"{dist}.dist-info/RECORD", "")


def resolve(python: str, opts: Options, roots: list[str], work: Path) -> list[dict]:
    """pip's resolution for one Python version (``pip install --dry-run --report``). pip evaluates
    markers for the building Python: those holding for the target only are added and resolved again."""
    env = dict(default_environment(), python_version=python, platform_machine=opts.arch, sys_platform="linux",
               platform_system="Linux", os_name="posix", implementation_name="cpython", extra="")
    if python != "%d.%d" % sys.version_info[:2]:
        env["python_full_version"] = env["implementation_version"] = python + ".0"
    added: list[str] = []
    for _ in range(4):
        pip(["install", "--dry-run", "--ignore-installed", "--target", str(work / "target"), "--report",
             str(work / "report.json"), "--find-links", str(work / "placeholders"), *target_args(python, opts),
             *roots, *added], f"resolving the wheelhouse for Python {python}")
        items = json.loads((work / "report.json").read_text())["install"]
        have = {norm(i["metadata"]["name"]) for i in items}
        reqs = [Requirement(r) for i in items for r in i["metadata"].get("requires_dist", [])]
        missed = sorted({f"{r.name}{r.specifier}" for r in reqs if r.marker and norm(r.name) not in have
                         and r.marker.evaluate(env)})
        if not missed:
            return items
        log(f"  Python {python}: also {', '.join(missed)} (markers that hold for Python {python})")
        added += missed
    raise BuildError(f"the wheelhouse for Python {python} does not settle: {', '.join(added)}")


def fill_wheelhouse(python: str, opts: Options, roots: list[str], wheelhouse: Path) -> None:
    """Adds one Python version's wheels to ``wheelhouse`` and their pins to its requirements.txt."""
    explicit = {norm(Requirement(r).name) for r in roots[1:]}
    provided = [n for n in KAGGLE_PROVIDED if n not in explicit]  # named in --deps: carried anyway
    with tempfile.TemporaryDirectory(dir=wheelhouse.parent) as tmp:
        write_placeholders(provided, Path(tmp) / "placeholders", target_args(python, opts))
        items = resolve(python, opts, roots, Path(tmp))
        chosen = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
        taken = sorted(n for n, v in chosen.items() if v.endswith(PLACEHOLDER))
        pins = [f"{n}=={v}" for n, v in sorted(chosen.items()) if n not in taken and n != "hpa-kernel"]
        for pin in [p for p in pins if p.split("==")[0] in provided]:
            raise BuildError(f"pip wants {pin}, which the version installed here (the stand-in for the Kaggle "
                             "image's) does not satisfy: upgrade it here, or carry it with --deps")
        pip(["download", "--no-deps", *target_args(python, opts), "-d", tmp, *pins],
            f"downloading the wheelhouse for Python {python}")
        for f in [f for f in Path(tmp).glob("*.whl") if not (wheelhouse / f.name).exists()]:
            shutil.move(str(f), wheelhouse / f.name)
    with open(wheelhouse / "requirements.txt", "a") as f:
        f.writelines(f'{pin} ; python_version == "{python}"\n' for pin in pins)
    log(f"  Python {python}: {len(pins)} wheels: {', '.join(pins)}")
    log(f"  Python {python}: from the Kaggle image: {', '.join(taken)}")


def wheelhouse(opts: Options, wheel: Path, dest: Path) -> None:
    dest.mkdir()
    if not opts.wheelhouse:
        log("wheelhouse: skipped (--no-wheelhouse); the kernel relies on the Kaggle image's packages")
        return
    reqs = default_deps(wheel) if opts.deps is None else opts.deps
    (dest / "requirements.txt").write_text("")
    for python in opts.python:
        log(f"wheelhouse for Python {python} / {opts.platform[0]}: pip resolves hpa_kernel's requirements"
            + f" and {' '.join(reqs)}" * bool(reqs))
        fill_wheelhouse(python, opts, [str(wheel), *reqs], dest)


def test_load(manifest: Path, src: Path) -> int:
    """How many classifiers the kernel's own loader refuses (e.g. a training state), each logged."""
    sys.path.insert(0, str(src))
    try:
        from hpa_kernel.config import ConfigError, load_config
        from hpa_kernel.stages.model import CheckpointError
        from hpa_kernel.stages.predictor import load_classifier
    except ImportError as e:
        raise BuildError(f"cannot test-load the classifiers with {sys.executable} ({e}): "
                         "build with a Python that has torch and timm (PYTHON=...), or --no-weights-check") from None
    try:
        config = load_config(manifest, allow_outside=True)
    except ConfigError as e:
        raise BuildError(str(e)) from None
    bad = 0
    for c in config.classifiers:
        if any(not Path(p).is_file() and not Path(p).is_relative_to(manifest.parent) for p in c.paths):
            log(f"classifier {c.name}: not here (outside the dataset), not test-loaded")
            continue
        try:
            meta = load_classifier(c).meta  # the kernel's own loader, in the entry's format
        except CheckpointError as e:
            logger.error(f"error: the kernel cannot load classifier {e}")
            bad += 1
        else:
            log(f"classifier {c.name}: loads ({meta['backbone']}, {meta['image_size']} px, "
                f"crops {meta['crop_size']} px, input {meta.get('input', 'hpa_kernel')})")
    return bad


def dataset_folder(opts: Options, stage: Path, wheel: Path) -> None:
    ds = stage / "kaggle_dataset"
    shutil.copytree(stage / "wheelhouse", ds / "wheelhouse")
    shutil.copy2(wheel, ds / wheel.name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store", ".git*")
    shutil.copytree(opts.weights, ds / "weights", symlinks=True, ignore=junk)
    manifest = ds / "weights" / "manifest.json"
    if opts.weights_check:
        check = [sys.executable, "-m", "hpa_kernel.integrity", "--manifest", str(manifest), "--allow-outside-paths",
                 "--inside-only", "-q"]
        if subprocess.run(check, env=dict(os.environ, PYTHONPATH=str(stage / "src"))).returncode != 0:
            raise BuildError(f"the weights in {opts.weights} do not match manifest.json (run: python -m "
                             f"hpa_kernel.integrity --manifest {opts.weights}/manifest.json --update; "
                             "or --no-weights-check)")
        if test_load(manifest, stage / "src"):
            raise BuildError(f"a classifier of {opts.weights}/manifest.json cannot be loaded by the kernel (reason "
                             "above; a run's last.pt is a training state: use its best.pt or last_model.pt)")
    meta = {"title": opts.title, "id": opts.dataset_id, "licenses": [{"name": opts.license}]}
    (ds / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def kernel_folder(opts: Options, stage: Path) -> None:
    """submission/ with the ids filled in."""
    src, kd = REPO / "submission", stage / "kaggle_kernel"
    if not (src / "kernel.py").is_file() or not (src / "kernel-metadata.json").is_file():
        raise BuildError("submission/kernel.py or submission/kernel-metadata.json is missing")
    kd.mkdir()
    shutil.copy2(src / "kernel.py", kd / "kernel.py")
    meta = json.loads((src / "kernel-metadata.json").read_text())
    meta["id"] = opts.kernel_id
    meta["title"] = opts.kernel_id.split("/", 1)[1]  # the title must resolve to the slug
    keep = [d for d in meta.get("dataset_sources", []) if not d.startswith("USERNAME/") and d != opts.dataset_id]
    meta["dataset_sources"] = list(dict.fromkeys([opts.dataset_id, *keep, *opts.extra_dataset]))
    (kd / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def swap_in(opts: Options, stage: Path, wheel: Path) -> None:
    """Replaces the outputs of earlier runs (stale wheels included) by the staged ones."""
    ours = (wheel.name, "wheelhouse", "kaggle_dataset", "kaggle_kernel")
    for old in ours[1:]:
        shutil.rmtree(opts.out / old, ignore_errors=True)
    for old in opts.out.glob("hpa_kernel-*.whl"):
        old.unlink()
    for new in (wheel, *(stage / name for name in ours[1:])):
        new.rename(opts.out / new.name)
    log("done:")
    for p in sorted(p for p in opts.out.rglob("*") if p.is_file() and p.relative_to(opts.out).parts[0] in ours):
        print(f"  {p.stat().st_size:12d}  {p.relative_to(opts.out)}", file=sys.stderr)
    if opts.dataset_id.startswith("USERNAME/"):
        log(f"note: dataset id is {opts.dataset_id}: pass --dataset-id <your kaggle name>/hpa-kernel before uploading")
    log(f"next: kaggle datasets create -p {opts.out}/kaggle_dataset --dir-mode zip   "
        f"(then: kaggle kernels push -p {opts.out}/kaggle_kernel)")


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # hpa_kernel's own loggers (test-load) keep their defaults
    try:
        args = parser().parse_args(argv)
        if args.print_kaggle_provided:
            print("\n".join(KAGGLE_PROVIDED))
            return 0
        opts = parse_options(args)
        isolated = not can_make_wheels(opts)
        stage = Path(tempfile.mkdtemp(prefix=".build_wheel.", dir=opts.out))
        try:
            (stage / "src").mkdir()
            wheel = build_wheel(stage / "src", stage / "wheel", isolated)
            check_wheel(wheel, stage / "src")
            wheelhouse(opts, wheel, stage / "wheelhouse")
            dataset_folder(opts, stage, wheel)
            kernel_folder(opts, stage)
            swap_in(opts, stage, wheel)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except BuildError as e:
        logger.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
