"""The benchmark registry and the evaluation package's layout: one module per benchmark under
`evaluation/benchmarks/`, and every name the old module paths exported still importable from them."""

import importlib
from pathlib import Path

import pytest

from defocus_mllm.evaluation import BENCHMARKS, Benchmark, get_benchmark
from defocus_mllm.evaluation import benchmarks as benchmarks_package

# modules of the package that hold no benchmark of their own: the base classes
BASE_MODULES = {"__init__", "base", "soft_vqa"}


def test_each_registered_benchmark_lives_in_its_own_module():
    modules = {name: cls.__module__ for name, cls in BENCHMARKS.items()}
    for name, module in modules.items():
        package, _, leaf = module.rpartition(".")
        assert package == "defocus_mllm.evaluation.benchmarks" and leaf not in BASE_MODULES, (name, module)
    assert len(set(modules.values())) == len(modules), "two benchmarks share a module"
    for name, cls in BENCHMARKS.items():
        module = importlib.import_module(cls.__module__)
        registered_here = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Benchmark)
                           and v.__module__ == module.__name__ and v in BENCHMARKS.values()]
        assert registered_here == [cls], name
    # and no module of the package is left out of the registry
    files = {p.stem for p in Path(benchmarks_package.__file__).parent.glob("*.py")} - BASE_MODULES
    assert files == {m.rpartition(".")[2] for m in modules.values()}


def test_registry_names_match_the_classes_and_aliases_resolve():
    for name, cls in BENCHMARKS.items():
        assert cls.name == name and isinstance(get_benchmark(name), cls)
    assert isinstance(get_benchmark("SQA"), BENCHMARKS["scienceqa"])
    assert isinstance(get_benchmark("easy_vqa"), BENCHMARKS["easy-vqa"])
    with pytest.raises(KeyError, match="unknown benchmark 'imagenet'"):
        get_benchmark("imagenet")


# old module ("." for the package), a name it exported, the module that defines the name now ("-": a value that carries
# no module of its own, such as a constant or a compiled pattern)
OLD_NAMES = [line.split() for line in """
tasks VQAv2 benchmarks.vqav2
tasks _answers_from benchmarks.base
tasks _SoftVQA benchmarks.soft_vqa
tasks mme_ground_truth benchmarks.mme
metrics pope_metrics benchmarks.pope
metrics _SQA_THE_ANSWER_IS -
generation run_benchmark runner
generation load_model runner
generation _append_safe predictions
generation ResumeMismatchError predictions
generation model_fingerprint fingerprints
generation _split distributed
generation build_prompt defocus_mllm.prompts
. pope_metrics benchmarks.pope
. read_predictions predictions
. SHORT_ANSWER -
""".strip().splitlines()]


@pytest.mark.parametrize("module,name,new_home", OLD_NAMES)
def test_old_module_paths_keep_their_names(module, name, new_home):
    old = importlib.import_module("defocus_mllm.evaluation" + (f".{module}" if module != "." else ""))
    value = getattr(old, name)
    assert value is not None
    if new_home != "-":
        expected = new_home if new_home.startswith("defocus_mllm.") else f"defocus_mllm.evaluation.{new_home}"
        assert value.__module__ == expected
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(old, "not_a_name")


def test_the_public_api_is_small_and_importable():
    import defocus_mllm.evaluation as evaluation

    assert len(evaluation.__all__) <= 14
    for name in evaluation.__all__:
        assert getattr(evaluation, name) is not None
