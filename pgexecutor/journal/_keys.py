"""Keys: how a journal names an input, and the ``Journal`` object that configures it.

The default key of an input is ``sha256(material(fn) + b"\\0" + pickle(args, 4))``, 32
hex digits. ``material(fn)`` must tell apart every two functions that could compute
different results from the same input, and be the same in another process for the
same function:

* a function that travels to workers by reference (a module's own function, not
  ``__main__``'s), or a named one with nothing captured: its ``module.qualname``
  (what journals of earlier versions used, so their rows still match). A worker
  imports such a function from its module: whatever the parent's copy captured
  does not change what runs;
* what it captured, when it captured anything: closure cells, defaults and
  keyword defaults, the instance of a bound method, a partial's arguments, the
  state of a callable instance;
* its code (bytecode, constants, names), when its name does not identify it: a
  lambda, or a function made inside another (``<locals>`` in its qualname), so
  ``make_scaler(2)`` and ``make_scaler(10)``, or two lambdas, never share rows.

Captured state is encoded canonically (:func:`_canon`), not pickled: sets and dict
items are sorted by their encoding, so the key does not follow the per-process
string hash; objects go through their ``__reduce_ex__(4)``. State that has no such
form (a lock, a file, a generator) raises JournalError that names the way out,
``key=``. Editing the body of a *named* function keeps its rows (a fix to a plot or
a log line does not rerun a week's sweep); the README says so.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import reprlib
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

from ..errors import JournalError

_KEY_PROTOCOL = 4  # fixed, so that a Python whose default protocol changes keeps the keys
_STATE_TAG = b"\0pgx-key-2\0"  # after the name when captured state or code follow
_MAX_DEPTH = 64  # nesting of captured state we follow before giving up


class Journal:
    """Where a ``map`` records each input's outcome, and how it names inputs.

    ``path``: the SQLite file (created if missing; an existing file that is not a
    journal is refused, never overwritten). ``key``: ``key(*args)`` -> str or int,
    an input's name in the journal; by default a hash of the task function (its
    name, what it captured, and its code where the name does not identify it) and
    the pickled input. ``quarantine_after``: an input whose task killed its worker
    (timeout, crash, memory) this many times, over all runs, is not run again and
    yields :class:`~pgexecutor.QuarantinedError`.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike[Any],
        *,
        key: Callable[..., Any] | None = None,
        quarantine_after: int = 2,
    ) -> None:
        self.path = os.fsdecode(os.fspath(path))
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable or None, got {key!r}")
        if isinstance(quarantine_after, bool) or not isinstance(quarantine_after, int):
            raise TypeError("quarantine_after must be an int")
        if quarantine_after < 1:
            raise ValueError("quarantine_after must be >= 1")
        self.key = key
        self.quarantine_after = quarantine_after

    def __repr__(self) -> str:
        return (
            f"Journal({self.path!r}, key={self.key!r}, "
            f"quarantine_after={self.quarantine_after})"
        )


def as_journal(journal: Any) -> Journal:
    if isinstance(journal, Journal):
        return journal
    if isinstance(journal, (str, bytes, os.PathLike)):
        return Journal(journal)
    raise TypeError(f"journal must be a path or a pgexecutor.Journal, got {journal!r}")


# ---------------------------------------------------------------- the function's part


def function_name(fn: Any) -> str:
    """``module.qualname`` of a task function (of its class, for other callables)."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({function_name(fn.func)})"
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(qualname, str):
        qualname, module = type(fn).__qualname__, type(fn).__module__
    return f"{module}.{qualname}"


def _named(qualname: str) -> bool:
    """Whether a qualified name identifies one function of its module."""
    return "<locals>" not in qualname and "<lambda>" not in qualname


def function_material(fn: Any) -> bytes:
    """What of ``fn`` goes into the default key (see the module docstring).

    Raises JournalError when part of it has no canonical form.
    """
    name = function_name(fn).encode()
    if isinstance(fn, types.FunctionType) and (
        _by_reference(fn) or (_named(fn.__qualname__) and not (
            fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__
        ))
    ):
        return name  # the common case, and the key of earlier versions
    if isinstance(fn, types.BuiltinFunctionType) and (
        fn.__self__ is None or isinstance(fn.__self__, types.ModuleType)
    ):
        return name
    if isinstance(fn, type):
        return name if _named(fn.__qualname__) else name + _STATE_TAG + _canon(fn)
    try:
        state = _canon_callable(fn, [], 0)
        if _canon_callable(fn, [], 0) != state:
            raise _NoCanonicalForm("state that encodes differently each time it is read")
    except _NoCanonicalForm as exc:
        raise JournalError(
            f"no default journal key can be made for {function_name(fn)}: {exc}, which "
            "has no stable form to tell this function from another (the key must not "
            "let two different functions share rows); pass Journal(path, key=...) to "
            "name the inputs yourself"
        ) from exc.__cause__
    return name + _STATE_TAG + state


def _by_reference(fn: types.FunctionType) -> bool:
    """Whether ``fn`` travels to a worker by reference: it is what its module (not
    ``__main__``) holds under its qualified name. The worker then runs the object
    its own import of that module makes, closure and defaults included, so what
    the parent's copy captured does not change what runs: the name says it all.
    (A module registered with ``cloudpickle.register_pickle_by_value`` travels by
    value; its functions are keyed by name all the same.)"""
    module, qualname = fn.__module__, fn.__qualname__
    if not isinstance(module, str) or module == "__main__" or not _named(qualname):
        return False
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return obj is fn


class _NoCanonicalForm(Exception):
    pass


def _canon_callable(fn: Any, stack: list[int], depth: int) -> bytes:
    """A function-like object: its code where its name does not identify it, and
    whatever it captured."""
    if isinstance(fn, functools.partial):
        return b"P" + _seq(
            [_canon_callable(fn.func, stack, depth + 1), _canon(fn.args, stack, depth + 1),
             _canon(fn.keywords, stack, depth + 1)]
        )
    if isinstance(fn, types.MethodType):
        return b"M" + _seq(
            [_canon_callable(fn.__func__, stack, depth + 1), _canon(fn.__self__, stack, depth + 1)]
        )
    if isinstance(fn, types.FunctionType):
        parts = [function_name(fn).encode()]
        if not _named(fn.__qualname__):
            parts.append(_canon_code(fn.__code__))
        cells = []
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name not bound yet)
                cells.append(_seq([name.encode(), b"E"]))
                continue
            if value is fn:
                cells.append(_seq([name.encode(), b"S"]))  # recursion through itself
                continue
            try:
                cells.append(_seq([name.encode(), _canon(value, stack, depth + 1)]))
            except _NoCanonicalForm as exc:
                raise _NoCanonicalForm(f"its closure variable {name!r} holds {exc}") from (
                    exc.__cause__
                )
        parts.append(_seq(cells))
        try:
            parts.append(_canon(fn.__defaults__, stack, depth + 1))
            parts.append(_canon(fn.__kwdefaults__, stack, depth + 1))
        except _NoCanonicalForm as exc:
            raise _NoCanonicalForm(f"a default argument holds {exc}") from exc.__cause__
        return b"F" + _seq(parts)
    if isinstance(fn, types.BuiltinFunctionType):
        owner = fn.__self__
        if owner is None or isinstance(owner, types.ModuleType):
            return b"B" + function_name(fn).encode()
        return b"B" + _seq([function_name(fn).encode(), _canon(owner, stack, depth + 1)])
    # Another callable: a class instance with __call__, a method-wrapper...: its type
    # and its state.
    return b"C" + _seq([function_name(type(fn)).encode(), _canon_object(fn, stack, depth + 1)])


def _canon_code(code: types.CodeType) -> bytes:
    """Bytecode, constants (nested code too) and names; not line numbers, so a line
    added above a lambda keeps its rows. Python versions differ in bytecode."""
    consts = []
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            consts.append(_canon_code(c))
        else:
            consts.append(_canon(c))
    return b"K" + _seq(
        [code.co_code, _seq(consts), _seq([n.encode() for n in code.co_names]),
         _seq([n.encode() for n in code.co_varnames]),
         _seq([n.encode() for n in code.co_freevars]),
         struct.pack("<iii", code.co_argcount, code.co_kwonlyargcount, code.co_flags)]
    )


# ---------------------------------------------------------------- canonical encoding


def _seq(parts: list[bytes]) -> bytes:
    """Length-prefixed concatenation: no two lists of parts share an encoding."""
    return struct.pack("<I", len(parts)) + b"".join(
        struct.pack("<Q", len(p)) + p for p in parts
    )


def _canon(obj: Any, stack: list[int] | None = None, depth: int = 0) -> bytes:
    """A byte string that is equal for equal captured state, in any process.

    ``stack`` holds the ids of the containers being encoded (a cycle refers back by
    position instead of recursing forever).
    """
    if stack is None:
        stack = []
    if depth > _MAX_DEPTH:
        raise _NoCanonicalForm(f"state nested deeper than {_MAX_DEPTH} levels")
    t = type(obj)
    if obj is None or t is bool:
        return b"N" + repr(obj).encode()
    if t is int:
        return b"I" + str(obj).encode()
    if t is float:
        return b"D" + struct.pack("<d", obj)
    if t is complex:
        return b"J" + struct.pack("<dd", obj.real, obj.imag)
    if t is str:
        return b"S" + obj.encode("utf-8", "surrogatepass")
    if t in (bytes, bytearray):
        return (b"Y" if t is bytes else b"A") + bytes(obj)
    if isinstance(obj, (types.ModuleType,)):
        return b"m" + obj.__name__.encode()
    if isinstance(obj, type):
        return b"T" + function_name(obj).encode() + (
            b"" if _named(obj.__qualname__) else _canon_class_body(obj, stack, depth)
        )
    if id(obj) in stack:
        return b"R" + str(len(stack) - stack.index(id(obj))).encode()
    stack.append(id(obj))
    try:
        if t in (tuple, list):
            return (b"(" if t is tuple else b"[") + _seq([_canon(x, stack, depth + 1) for x in obj])
        if t in (set, frozenset):
            return (b"{" if t is set else b"f") + _seq(sorted(_canon(x, stack, depth + 1) for x in obj))
        if t is dict:
            items = sorted(
                _seq([_canon(k, stack, depth + 1), _canon(v, stack, depth + 1)])
                for k, v in obj.items()
            )
            return b"d" + _seq(items)
        if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial,
                            types.BuiltinFunctionType)):
            return _canon_callable(obj, stack, depth + 1)
        return _canon_object(obj, stack, depth + 1)
    finally:
        stack.pop()


def _canon_class_body(cls: type, stack: list[int], depth: int) -> bytes:
    """A class made inside a function: its methods' code and plain attributes."""
    parts = []
    for name, value in sorted(vars(cls).items()):
        if name in ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__"):
            continue
        inner = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        try:
            parts.append(_seq([name.encode(), _canon(inner, stack, depth + 1)]))
        except _NoCanonicalForm:
            parts.append(_seq([name.encode(), type(inner).__qualname__.encode()]))
    return _seq(parts)


def _canon_object(obj: Any, stack: list[int], depth: int) -> bytes:
    """Any other object, by what pickle would save of it (``__reduce_ex__(4)``)."""
    try:
        reduced = obj.__reduce_ex__(_KEY_PROTOCOL)
    except Exception as exc:
        raise _NoCanonicalForm(f"{_describe(obj)} (it does not pickle: {exc})") from exc
    if isinstance(reduced, str):
        return b"G" + reduced.encode()
    if not isinstance(reduced, tuple) or len(reduced) < 2:
        raise _NoCanonicalForm(f"{_describe(obj)} (an unusual __reduce__)")
    func, args, *rest = reduced
    state = rest[0] if rest else None
    listitems = list(rest[1]) if len(rest) > 1 and rest[1] is not None else []
    dictitems = list(rest[2]) if len(rest) > 2 and rest[2] is not None else []
    return b"O" + _seq([
        _canon(func, stack, depth + 1),
        _canon(args, stack, depth + 1),
        _canon(state, stack, depth + 1),
        _canon(listitems, stack, depth + 1),
        _canon(dict(dictitems), stack, depth + 1) if dictitems else b"",
    ])


_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = 160
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def _describe(obj: Any) -> str:
    try:
        return f"a {type(obj).__qualname__} ({_repr.repr(obj)[:80]})"
    except Exception:
        return f"a {type(obj).__qualname__}"


# ---------------------------------------------------------------- inputs


def default_key(fn: Any, args: tuple[Any, ...]) -> str:
    """The default key: sha256 of the function's material (see the module docstring)
    and the input pickled with the standard pickle (protocol 4), as 32 hex digits.

    Stable across runs and machines for inputs whose pickle is (numbers, strings,
    tuples, lists, dicts built in the same order, dataclasses, numpy arrays). Not for
    sets of strings (their order follows the per-process string hash) or objects that
    pickle differently each time: pass ``key=`` for those.
    """
    digest = hashlib.sha256(function_material(fn))
    digest.update(b"\0")
    digest.update(pickle.dumps(args, protocol=_KEY_PROTOCOL))
    return digest.hexdigest()[:32]


_PLAIN_REPR = (int, float, str, bytes, bool, type(None))


def short_repr(args: tuple[Any, ...]) -> str:
    """The input as the journal's ``input`` column shows it (200 characters at most)."""
    try:
        if all(type(a) in _PLAIN_REPR for a in args):  # the common case, 1/5 of reprlib
            return repr(args[0] if len(args) == 1 else args)[:200]
        return _repr.repr(args[0] if len(args) == 1 else args)[:200]
    except Exception as exc:  # a broken __repr__ must not lose the row
        return f"<unrepresentable input: {type(exc).__name__}>"


def make_keys(journal: Journal, fn: Any, inputs: list[tuple[Any, ...]]) -> list[str]:
    """Every input's key, or JournalError naming the input whose key cannot be made."""
    keys: list[str] = []
    if journal.key is None:
        base = hashlib.sha256(function_material(fn))
        base.update(b"\0")
        for i, args in enumerate(inputs):
            try:
                pickled = pickle.dumps(args, protocol=_KEY_PROTOCOL)
            except Exception as exc:
                raise JournalError(
                    f"input #{i} ({short_repr(args)}) cannot be pickled by the standard "
                    f"pickle, so it has no default journal key ({type(exc).__name__}: "
                    f"{exc}); pass Journal(path, key=...) to name the inputs yourself"
                ) from exc
            digest = base.copy()
            digest.update(pickled)
            keys.append(digest.hexdigest()[:32])
        return keys
    for i, args in enumerate(inputs):
        try:
            key = journal.key(*args)
        except Exception as exc:
            raise JournalError(
                f"the journal's key= function raised for input #{i} ({short_repr(args)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise JournalError(
                f"the journal's key= function must return a str or an int; for input #{i} "
                f"({short_repr(args)}) it returned {key!r}"
            )
        keys.append(str(key))
    return keys
