"""Every public call and every public method or property of a public class says what it does (issue 24: 14 public
methods had no docstring)."""
import inspect

import blens_fast
import blens_fast.bulk
import blens_fast.counterfact
import blens_fast.editing

#: the public namespaces: the package and its public subpackages, each by its __all__
NAMESPACES = (blens_fast, blens_fast.bulk, blens_fast.counterfact, blens_fast.editing)


def public_objects():
    for namespace in NAMESPACES:
        for name in namespace.__all__:
            value = getattr(namespace, name)
            if not inspect.ismodule(value):
                yield f"{namespace.__name__}.{name}", value


def members(cls):
    """``(name, function)`` of every public method, property, static and class method the class itself defines."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            yield name, value


def undocumented() -> list[str]:
    missing = []
    for name, value in public_objects():
        if not (inspect.getdoc(value) or "").strip():
            missing.append(name)
        if inspect.isclass(value) and value.__module__.startswith("blens_fast"):
            missing += [f"{name}.{member}" for member, fn in members(value) if not (fn.__doc__ or "").strip()]
    return sorted(set(missing))


def test_every_public_callable_and_method_has_a_docstring():
    assert len(list(public_objects())) > 30  # the walk finds the API
    assert undocumented() == []
