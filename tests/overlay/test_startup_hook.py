"""The start-up hook on the installed wheel: every process, the off switch, the guard, -S."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

PY = sys.executable
SITE = Path(sysconfig.get_paths()["purelib"])
FORKED = "sglang.srt.configs.load_config"  # a light forked module (no torch import)

WHERE = textwrap.dedent(
    f"""
    import importlib.util, sys
    spec = importlib.util.find_spec({FORKED!r})
    print("ORIGIN", spec.origin)
    """
)


def run(code, env=None, args=()):
    full_env = dict(os.environ)
    full_env.pop("SGLANG_FASTLOAD", None)
    full_env.update(env or {})
    return subprocess.run([PY, *args, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def origin_of(proc):
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ORIGIN ")]
    assert lines, proc.stdout + proc.stderr
    return lines[-1].split(" ", 1)[1]


def is_overlay(path):
    return f"{os.sep}sglang_fastload{os.sep}_overlay{os.sep}" in path


def test_wheel_ships_pth_and_start_and_records_them():
    assert (SITE / "sglang_fastload.pth").is_file()
    assert (SITE / "sglang_fastload.start").read_text().strip() == "sglang_fastload._hook:install"
    record = next(SITE.glob("sglang_fastload-*.dist-info")) / "RECORD"
    names = {line.split(",")[0] for line in record.read_text().splitlines()}
    assert "sglang_fastload.pth" in names and "sglang_fastload.start" in names
    assert any(n.startswith("sglang_fastload/_overlay/sglang/srt/model_loader/loader.py") for n in names)


def test_main_process_resolves_overlay():
    assert is_overlay(origin_of(run(WHERE)))


def test_subprocess_resolves_overlay():
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {WHERE!r}], check=True)"
    assert is_overlay(origin_of(run(code)))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_child_resolves_overlay(method):
    code = textwrap.dedent(
        f"""
        import multiprocessing as mp
        def child(q):
            import importlib.util
            q.put(importlib.util.find_spec({FORKED!r}).origin)
        if __name__ == "__main__":
            ctx = mp.get_context({method!r})
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start(); print("ORIGIN", q.get(timeout=120)); p.join()
        """
    )
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastload_mp_{method}_{os.getpid()}.py"
    script.write_text(code)
    try:
        proc = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=300)
    finally:
        script.unlink()
    assert is_overlay(origin_of(proc))


def test_import_gives_overlay_module_with_fast_format():
    proc = run("import sglang.srt.configs.load_config as m; print('ORIGIN', m.__file__); print(m.LoadFormat('fast').value)")
    assert is_overlay(origin_of(proc))
    assert "fast" in proc.stdout.splitlines()


def test_cli_offers_fast_from_upstreams_unforked_choices_module():
    code = (
        "import sglang.srt.arg_groups.choices as c, sglang.srt.configs.load_config as l\n"
        "print('ORIGIN', c.__spec__.origin)\n"
        "print('CHOICE', c.LOAD_FORMAT_CHOICES.count('fast'))\n"
        "print('FORMAT', l.LoadFormat(c.LOAD_FORMAT_CHOICES[-1]).value)\n"
    )
    proc = run(code)
    assert not is_overlay(origin_of(proc))  # upstream's own file, extended after it ran
    assert "CHOICE 1" in proc.stdout and "FORMAT fast" in proc.stdout, proc.stdout + proc.stderr
    off = run(code.replace("print('FORMAT'", "#"), env={"SGLANG_FASTLOAD": "0"})
    assert "CHOICE 0" in off.stdout, off.stdout + off.stderr


def test_off_switch_gives_upstream_everywhere():
    proc = run(WHERE, env={"SGLANG_FASTLOAD": "0"})
    origin = origin_of(proc)
    assert not is_overlay(origin) and origin.endswith("sglang/srt/configs/load_config.py")
    assert proc.stderr == ""
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {WHERE!r}], check=True)"
    assert not is_overlay(origin_of(run(code, env={"SGLANG_FASTLOAD": "0"})))


def _package_copy_with_manifest(tmp_path, mutate):
    pkg = tmp_path / "sglang_fastload"
    shutil.copytree(SITE / "sglang_fastload", pkg)
    manifest_path = pkg / "_overlay" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    mutate(manifest)
    manifest_path.write_text(json.dumps(manifest))
    return {"PYTHONPATH": str(tmp_path)}


def test_version_mismatch_runs_upstream_with_one_warning(tmp_path):
    env = _package_copy_with_manifest(tmp_path, lambda m: m.update(base_version="0.5.22"))
    code = WHERE + f"import {FORKED} as m, sglang.srt.arg_groups.choices as c\nprint('ORIGIN', m.__file__)\n"
    proc = run(code, env=env)
    assert not is_overlay(origin_of(proc))
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("sglang-fastload:")]
    assert len(warnings) == 1, proc.stderr
    assert "0.5.23 is not the overlay's base 0.5.22" in warnings[0]
    assert "tools/sync_upstream.py --to 0.5.23" in warnings[0]


def test_hash_mismatch_runs_upstream_with_one_warning(tmp_path):
    def corrupt(m):
        m["modules"]["sglang.srt.models.qwen3_moe"]["base_sha256"] = "0" * 64

    env = _package_copy_with_manifest(tmp_path, corrupt)
    proc = run(WHERE + f"import {FORKED}\n", env=env)
    assert not is_overlay(origin_of(proc))
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("sglang-fastload:")]
    assert len(warnings) == 1 and "sha256 mismatch" in warnings[0] and "qwen3_moe.py" in warnings[0]


def test_dash_S_prints_nothing():
    proc = run("pass", args=("-S",))
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_plain_interpreter_prints_nothing():
    proc = run("pass")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_pth_left_behind_without_package_is_silent(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(SITE / "sglang_fastload.pth", site_dir)
    # An interpreter that cannot import sglang_fastload (isolated from this venv).
    code = f"import site; site.addsitedir({str(site_dir)!r}); print('ok')"
    proc = subprocess.run(
        [PY, "-I", "-S", "-c", code], capture_output=True, text=True,
        env={"PATH": os.environ.get("PATH", "")}, timeout=60,
    )
    assert proc.stdout.strip() == "ok" and proc.stderr == ""
    probe = subprocess.run([PY, "-I", "-S", "-c", "import sglang_fastload"], capture_output=True, text=True)
    assert probe.returncode != 0  # proves the package really was not importable there


def test_hook_imports_only_the_stdlib_and_itself():
    proc = run("pass", args=("-X", "importtime"))
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    ours = [m for m in imported if "sglang" in m]
    assert set(ours) <= {"sglang_fastload", "sglang_fastload._hook", "sglang_fastload.constants"}, ours
    assert "sglang_fastload._hook" in ours  # the hook really ran
    for heavy in ("json", "hashlib", "importlib.metadata", "torch", "sglang"):
        assert heavy not in imported, heavy


def test_status_command_reports_active_and_inactive(tmp_path):
    proc = subprocess.run([PY, "-m", "sglang_fastload", "status"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ACTIVE" in proc.stdout and "sglang.srt.model_loader.loader ->" in proc.stdout
    assert "_overlay" in proc.stdout and "sglang_fastload.pth" in proc.stdout
    off = subprocess.run(
        [PY, "-m", "sglang_fastload", "status"], capture_output=True, text=True,
        env={**os.environ, "SGLANG_FASTLOAD": "0"},
    )
    assert off.returncode != 0 and "INACTIVE" in off.stdout and "SGLANG_FASTLOAD=0" in off.stdout
    assert "--load-format auto: upstream (SGLANG_FASTLOAD_AUTO_MEANS_FAST=unset)" in proc.stdout
    switched = subprocess.run(
        [PY, "-m", "sglang_fastload", "status"], capture_output=True, text=True,
        env={**os.environ, "SGLANG_FASTLOAD_AUTO_MEANS_FAST": "1", "SGLANG_FASTLOAD_UPDATE_SNAPSHOT": "1"},
    )
    assert "--load-format auto: served by fast for the models fast supports" in switched.stdout, switched.stdout
    assert "host snapshot before updates: on" in switched.stdout
    store = tmp_path / "plans"
    store.mkdir()
    (store / "k.plan.json.gz").write_bytes(b"")
    store_on = subprocess.run(
        [PY, "-m", "sglang_fastload", "status"], capture_output=True, text=True,
        env={**os.environ, "SGLANG_FASTLOAD_PLAN_STORE": "1", "SGLANG_FASTLOAD_PLAN_DIR": str(store)},
    )
    assert f"load plan store: on, {store} (1 plans;" in store_on.stdout, store_on.stdout
    store_off = subprocess.run(
        [PY, "-m", "sglang_fastload", "status"], capture_output=True, text=True,
        env={**os.environ, "SGLANG_FASTLOAD_PLAN_STORE": "0"},
    )
    assert "load plan store: off (SGLANG_FASTLOAD_PLAN_STORE=0)" in store_off.stdout, store_off.stdout


def test_wheel_install_and_uninstall_in_fresh_venv(tmp_path):
    dist = Path(__file__).resolve().parents[2] / "dist"
    wheels = sorted(dist.glob("sglang_fastload-*.whl"))
    assert wheels, "ci/setup_env.sh builds the wheel into dist/"
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.check_output([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    pip = [PY, "-m", "pip", "--python", str(vpy), "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", str(wheels[-1])], check=True)
    assert (vsite / "sglang_fastload.pth").is_file() and (vsite / "sglang_fastload.start").is_file()
    # No sglang in this venv: the hook installs, stays silent, and status says why it is inactive.
    quiet = subprocess.run([str(vpy), "-c", "import sys; print(any(type(f).__name__=='OverlayFinder' for f in sys.meta_path))"], capture_output=True, text=True)
    assert quiet.stdout.strip() == "True" and quiet.stderr == ""
    st = subprocess.run([str(vpy), "-m", "sglang_fastload", "status"], capture_output=True, text=True)
    assert st.returncode != 0 and "sglang is not installed" in st.stdout
    subprocess.run([*pip, "uninstall", "-y", "sglang-fastload"], check=True)
    assert not (vsite / "sglang_fastload.pth").exists() and not (vsite / "sglang_fastload.start").exists()
    assert not (vsite / "sglang_fastload").exists()


def test_install_pth_and_uninstall_pth_commands(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    repo = Path(__file__).resolve().parents[2]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(repo)}
    out = subprocess.run([str(vpy), "-m", "sglang_fastload", "install-pth"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "sglang_fastload.pth" in out.stdout
    check = "import sys; print(any(type(f).__name__=='OverlayFinder' for f in sys.meta_path))"
    assert subprocess.run([str(vpy), "-c", check], capture_output=True, text=True, env=env).stdout.strip() == "True"
    subprocess.run([str(vpy), "-m", "sglang_fastload", "uninstall-pth"], check=True, env=env, capture_output=True)
    assert subprocess.run([str(vpy), "-c", check], capture_output=True, text=True, env=env).stdout.strip() == "False"
