"""Module names say their concern (issue 22): no two modules or packages of the installed
``refimpl`` share a name, so ``model``, ``precision`` or ``train`` mean one thing (the CLI's
modules are ``<group>_commands``, the golden suites ``<family>_suites``)."""
import collections
import pkgutil

import refimpl
import refimpl.cli  # noqa: F401  (installed from the repository's cli/)


def module_names():
    """Every module and package under ``refimpl`` (``__init__``/``__main__`` aside):
    ``{last name: [dotted names]}``."""
    names = collections.defaultdict(list)
    # refimpl.cli lives in the repository's cli/ (setup.cfg package_dir): walked on its own
    for path, prefix in ((refimpl.__path__, "refimpl."), (refimpl.cli.__path__, "refimpl.cli.")):
        for info in pkgutil.walk_packages(path, prefix):
            in_cli = info.name == "refimpl.cli" or info.name.startswith("refimpl.cli.")
            if prefix == "refimpl.cli." or not in_cli:  # an installed wheel has both
                names[info.name.rsplit(".", 1)[-1]].append(info.name)
    names["cli"].append("refimpl.cli")
    return names


def test_no_two_modules_share_a_name():
    twice = {k: v for k, v in module_names().items() if len(v) > 1}
    assert not twice, f"modules sharing a name: {twice}"


def test_the_walk_sees_the_subpackages():
    """The walk reaches the CLI, the golden package and the SDN package (else the test above
    would pass vacuously)."""
    names = module_names()
    for dotted in ("refimpl.cli.main", "refimpl.golden.verify", "refimpl.sdn.fused",
                   "refimpl.ops"):
        assert dotted in names[dotted.rsplit(".", 1)[-1]]
