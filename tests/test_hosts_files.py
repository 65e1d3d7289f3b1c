"""Hosts, hosts files, and copy_files' selection rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from remote_objects import Recorder

from isdgrid import ConfigError, Grid, Host, create_host_list, load_hosts
from isdgrid.files import select_files


def test_host_defaults_and_validation() -> None:
    h = Host("node1")
    assert (h.n_cpu, h.niceness, h.python, h.init_cmd, h.temp_path) == (1, 0, "python3", "", None)
    with pytest.raises(ConfigError, match="n_cpu"):
        Host("node1", n_cpu=0)
    with pytest.raises(ConfigError, match="niceness"):
        Host("node1", niceness=40)
    with pytest.raises(ConfigError, match="name"):
        Host("")


def test_create_host_list_merges_repeated_names() -> None:
    hosts = create_host_list(["a", "b", "a"], "/tmp/x", niceness=3)
    assert [(h.name, h.n_cpu, h.temp_path, h.niceness) for h in hosts] == [("a", 2, "/tmp/x", 3), ("b", 1, "/tmp/x", 3)]


def test_load_hosts_reads_tables_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "hosts.toml"
    f.write_text(
        '[defaults]\npython = "python3.11"\n\n'
        '[[host]]\nname = "localhost"\nn_cpu = 4\n\n'
        '[[host]]\nname = "node7"\nn_cpu = 8\nniceness = 5\ninit_cmd = "module load python"\n'
    )
    hosts = load_hosts(f)
    assert hosts == [
        Host("localhost", n_cpu=4, python="python3.11"),
        Host("node7", n_cpu=8, niceness=5, python="python3.11", init_cmd="module load python"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[host]]\nname = "a"\nncpu = 2\n', r"host 'a': unknown key\(s\) \['ncpu'\]"),
        ('[[host]]\nname = "a"\nn_cpu = "four"\n', "key 'n_cpu' must be int"),
        ('[[host]]\nn_cpu = 2\n', "missing key 'name'"),
        ('[[host]]\nname = "a"\nn_cpu = \n', r"invalid TOML: .*line 3"),
        ('[[host]]\nname = "a"\n[[host]]\nname = "a"\n', "listed twice"),
        ("", "no hosts"),
        ('[hostz]\nname = "a"\n', "unknown top-level key"),
    ],
)
def test_bad_hosts_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "hosts.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_hosts(f)
    assert str(f) in str(info.value)


def test_missing_hosts_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_hosts(tmp_path / "nope.toml")


def _tree(root: Path) -> None:
    for rel in ["a.py", "b.txt", "data/x.txt", "data/sub/y.txt", "data/z.dat", "Isd/foo.txt",
                "Isd/a/foo.txt", "Isd/a/b/c/foo.txt", "Isd/bar.txt", "cns/skip.py", ".svn/entries.py"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)


def test_select_files_follows_the_original_rules(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert sorted(select_files(str(tmp_path), ["Isd/foo.txt"])) == ["Isd/a/b/c/foo.txt", "Isd/a/foo.txt", "Isd/foo.txt"]
    assert sorted(select_files(str(tmp_path), ["data/*.txt"])) == ["data/sub/y.txt", "data/x.txt"]
    assert sorted(select_files(str(tmp_path), ["*.py"])) == ["a.py"]  # cns/ and .svn/ excluded
    assert sorted(select_files(str(tmp_path), ["*.py"], exclude=())) == [".svn/entries.py", "a.py", "cns/skip.py"]
    assert select_files(str(tmp_path), ["data/*.txt"], exclude=["sub"]) == ["data/x.txt"]


def test_copy_files_lands_in_temp_path_and_is_importable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "physics.py").write_text("def energy(x):\n    return 3 * x\n")
    (src / "data").mkdir()
    (src / "data" / "params.txt").write_text("7\n")
    with Grid([Host("localhost", n_cpu=2)]) as g:
        assert g.copy_files(str(src), ["*.py", "data/*.txt"]) == 3
        sid = g.publish(Recorder())

        def compute(x: int) -> int:
            import pkg.physics

            with open("data/params.txt") as fh:
                return pkg.physics.energy(x) + int(fh.read())

        assert g.gather(g.broadcast(sid, "apply", compute, 1), timeout=30) == [10, 10]
        g.release_all()
        temp = g.slots[0].handle.spec.temp_path
        assert (Path(temp) / "pkg" / "physics.py").read_text().startswith("def energy")
        assert (Path(temp) / "data" / "params.txt").exists()
