"""Options that more than one ``refimpl`` command takes, each declared once, here.

Modelled on rasterio's ``rio/options.py``. An option two commands take means one thing in both:
one flag, one type, one help text. Only its default may differ between commands, so an option
whose default does is a function taking it: ``default`` is a value of the option's type (help
shows ``[default: value]``), or None with ``described``, the text that says where the value
comes from instead (``[default: (as recorded in the checkpoint)]``). The others are decorators
to use as they are (``@options.json_opt``).

``tests/test_cli_options.py`` walks the command tree and fails where two commands declare one
flag differently, or where a flag two commands take is declared anywhere but here. A flag that
names different things in different commands is a homonym (renaming one would break command
lines people use): it is listed in :data:`HOMONYMS` with the reason, and a command declares its
own unless another takes it in the same way (then both use one declaration here).
"""
import click

from refimpl import golden as G
from refimpl.tasks import TASKS

from .common import choice

#: Flags that mean different things in different commands, and why; every other flag that two
#: commands take is declared once in this module.
HOMONYMS = {
    "--init": "train: the S4D initialisation of A (refimpl.ssm.INITS); sdn train: the "
              "initialisation of the SDN's training network (refimpl.sdn.INITS).",
    "--out": "what the command writes: a run folder (train), a folder of suite files (golden "
             "generate), a weights file (sdn train), an image (plot and raster share "
             "image_out_opt).",
    "--precision": "golden verify and conform: the one format the backend computes in "
                   "(backend_precision_opt); golden coverage: the formats to tabulate "
                   "(repeatable).",
    "--length": "generate: the number of tokens to generate (its own type and message, which "
                "tests/test_cli_text.py checks); elsewhere the sequence length L (length_opt).",
}


def compose(*decorators):
    """One decorator applying ``decorators``, listed in --help in the order given."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


class SharedOption(click.Option):
    """A ``click.Option`` declared in this module (the tests tell it from a local declaration
    by its class; it behaves as a plain option)."""


def _option(*decls, default=None, described=None, **attrs):
    """``click.option`` for a shared option: a value default is shown, a None default shows
    ``described`` (where the value comes from) if given."""
    show = True if default is not None else (described or False)
    return click.option(*decls, cls=SharedOption, default=default, show_default=show, **attrs)


def _flag(*decls, help):
    return click.option(*decls, cls=SharedOption, is_flag=True, help=help)


# -- any command that draws random numbers or writes a run ------------------------------------

def seed_opt(default=0, described=None):
    """``--seed``: a negative seed is refused by every command alike (NumPy would refuse it
    later, some commands with a traceback)."""
    return _option("--seed", default=default, described=described, type=click.IntRange(min=0),
                   help="Seed of the random draws (the same seed, the same result).")


overwrite_opt = _flag("--overwrite",
                      help="Replace what --out already holds (an interrupted run starts again).")

resume_opt = _flag("--resume",
                   help="Continue the interrupted run at --out, bit-exactly; it needs the same "
                        "options (--epochs included) and data.")


def image_out_opt(described):
    """``--out`` of the commands that draw an image (``--out`` is a homonym: :data:`HOMONYMS`)."""
    return _option("--out", described=described, type=click.Path(dir_okay=False),
                   help="Image to write, .png or .svg (an existing file is replaced).")


# -- campaigns of independent tasks (refimpl.campaign) -------------------------------------

workers_opt = _option("--workers", described="one per available core", type=click.IntRange(min=1),
                      help="Local worker processes; 1 = in this process, no pool. The results do "
                           "not depend on it.")


class SchedulerAddress(click.ParamType):
    """A Dask scheduler address: ``PROTOCOL://HOST:PORT`` (``tcp://10.0.0.5:8786``) or
    ``HOST:PORT`` (Dask's default protocol, tcp). ``samples``: a value it refuses and one it
    takes (tests/test_cli_options.py)."""

    name = "address"
    samples = ("not-an-address", "tcp://127.0.0.1:8786")

    def convert(self, value, param, ctx):
        v = str(value).strip()
        host = v.split("://", 1)[1] if "://" in v else v
        if not host or any(c.isspace() for c in v) or ("://" not in v and ":" not in v):
            self.fail(f"{value!r} is not a Dask scheduler address (tcp://HOST:PORT)", param, ctx)
        return v


scheduler_opt = _option("--scheduler", metavar="ADDRESS", type=SchedulerAddress(),
                        help="Run on the Dask cluster of this scheduler (tcp://host:8786; needs "
                             "pip install 'refimpl[dask]'); excludes --workers.")


# -- training ---------------------------------------------------------------------------------

def epochs_opt(default):
    return _option("--epochs", default=default, type=click.IntRange(min=1),
                   help="Passes over the training data.")


def batch_size_opt(default):
    return _option("--batch-size", default=default, type=click.IntRange(min=1),
                   help="Sequences per batch (in training: per AdamW step).")


def lr_opt(default):
    return _option("--lr", default=default, type=click.FloatRange(min=0, min_open=True),
                   help="Peak learning rate of AdamW (cosine schedule).")


def weight_decay_opt(default):
    return _option("--weight-decay", default=default, type=click.FloatRange(min=0),
                   help="AdamW decoupled weight decay.")


# -- data -------------------------------------------------------------------------------------

def task_opt(described=None):
    return _option("--task", described=described, type=choice(TASKS),
                   help="Built-in task (refimpl.tasks).")


def data_opt(described=None):
    return _option("--data", described=described, type=click.Path(dir_okay=False),
                   help="User data (.npz: x_train, y_train, x_test, y_test).")


def tokens_opt(default=0, described=None):
    return _option("--tokens", default=default, described=described, type=click.IntRange(min=0),
                   help="--data with integer inputs: the vocabulary size V (inputs go through a "
                        "token embedding); 0 = real-valued inputs.")


def text_opt(described=None):
    return _option("--text", "text_path", described=described, type=click.Path(dir_okay=False),
                   help="Text file: a language model's data (next-token prediction), in place "
                        "of --task or --data.")


def samples_opt(default, described=None):
    """``--samples``: at least 2, as a built-in task splits them into train and test."""
    return _option("--samples", default=default, described=described,
                   type=click.IntRange(min=2),
                   help="Sequences to draw (a built-in task: train and test together).")


def length_opt(default, described=None):
    return _option("--length", default=default, described=described, type=click.IntRange(min=1),
                   help="Sequence length L: time steps of every sequence drawn.")


# -- the SDN's target neuron and inputs (refimpl sdn) ----------------------------------------

def tau_opt(default, described=None):
    return _option("--tau", default=default, described=described, type=float,
                   help="LIF decay tau of the target neuron, in [0, 1).")


def theta_opt(default, described=None):
    return _option("--theta", default=default, described=described, type=float,
                   help="LIF threshold theta of the target neuron (> 0).")


def mean_opt(default):
    return _option("--mean", default=default, type=float, help="Mean of the Gaussian inputs.")


def std_opt(default):
    return _option("--std", default=default, type=float,
                   help="Standard deviation of the Gaussian inputs.")


# -- golden files (refimpl golden) ------------------------------------------------------------

golden_dir_opt = _option("--golden", "golden_dir", default=str(G.DEFAULT_DIR),
                         type=click.Path(file_okay=False),
                         help="Folder of the golden <suite>.h5 files.")

suites_opt = _option("--suite", "suites", multiple=True, type=choice(G.SUITES),
                     help="Only this suite (repeatable); default: all.")

backend_precision_opt = _option(
    "--precision", default="float64", type=click.Choice(list(G.PROFILES)),
    help="The format the backend computes in: bounds re-derived for its epsilon, spike flips "
         "within the bound ACCEPTABLE (golden/SCHEMA.md).")

json_opt = _option("--json", "json_path", type=click.Path(dir_okay=False),
                   help="Also write the report as JSON to this file.")

verbose_opt = _flag("-v", "--verbose", help="Show a detail column for every row.")
