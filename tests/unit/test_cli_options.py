"""`--set KEY=VALUE` method options: typed, checked against the API's options message before
any model loads, with precise messages."""

import pytest
from click.testing import CliRunner

from editserve.client.cli import main
from editserve.client.convert import edit_request, option_names
from editserve.client.types import Fact


@pytest.mark.parametrize("args, message", [
    (["--set", "foo=1"], "unknown rome option 'foo'; known: ['clamp_norm_factor'"),
    (["--set", "steps=0.5"], "rome option 'steps' cannot be 0.5"),
    (["--set", "steps"], "expected KEY=VALUE, got 'steps'"),
    (["--method", "ft_l", "--set", "clamp_norm_factor=2"], "unknown ft_l option 'clamp_norm_factor'"),
    (["--revert-sample", "10"], "needs --sequential"),
    (["--sequential", "--revert-sample", "-1"], "-1 is not in the range"),
])
def test_bad_options_fail_before_anything_runs(args, message):
    result = CliRunner().invoke(main, ["eval", "--n", "1", "--model", "/nonexistent", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_options_become_typed_request_fields():
    request = edit_request(Fact("{} is", "x", "y"), method="rome", steps=40, clamp_norm_factor=4, stats_source="model")
    assert request.rome.steps == 40 and request.rome.clamp_norm_factor == 4.0 and request.rome.stats_source == "model"
    assert "norm_constraint" in option_names("ft_l")


def test_list_options_and_memit_fields():
    result = CliRunner().invoke(main, ["eval", "--n", "1", "--model", "/nonexistent", "--method", "memit",
                                       "--set", "layers=3,4,5", "--set", "bogus=1"])
    assert result.exit_code == 2 and "unknown memit option 'bogus'" in result.output, result.output
    request = edit_request(Fact("{} is", "x", "y"), method="memit", layers=[3, 4, 5], batch_facts=8)
    assert list(request.memit.layers) == [3, 4, 5] and request.memit.batch_facts == 8


def test_named_dataset_needs_a_data_dir_and_says_where_to_get_it(monkeypatch):
    monkeypatch.delenv("EDITSERVE_DATA", raising=False)
    result = CliRunner().invoke(main, ["eval", "--n", "1", "--dataset", "counterfact"])
    assert result.exit_code == 2, result.output
    assert "--data-dir" in result.output and "rome.baulab.info" in result.output


def test_edit_needs_a_fact_or_a_facts_file(tmp_path):
    result = CliRunner().invoke(main, ["edit", "--method", "memit", "--prompt", "{} is"])
    assert result.exit_code == 2 and "--facts FILE" in result.output, result.output
    bad = tmp_path / "facts.json"
    bad.write_text('[{"prompt": "{} is"}]')
    result = CliRunner().invoke(main, ["edit", "--method", "memit", "--facts", str(bad)])
    assert result.exit_code == 2 and "subject" in result.output, result.output


def test_max_edit_facts_is_bounded():
    from editserve.server.config import ServeConfig

    with pytest.raises(ValueError, match="max_edit_facts"):
        ServeConfig().with_overrides(max_edit_facts=0)
    assert ServeConfig().with_overrides(max_edit_facts=5).max_edit_facts == 5


@pytest.mark.parametrize("value", [-1, 1 << 21, 1.5, True, "64"])
def test_prefix_cache_size_is_bounded(value):
    from editserve.server.config import ServeConfig

    with pytest.raises(ValueError, match=r"prefix_cache_mb must be an integer in \[0, 1048576\]"):
        ServeConfig().with_overrides(prefix_cache_mb=value)
    assert ServeConfig().with_overrides(prefix_cache_mb=0).prefix_cache_mb == 0


@pytest.mark.parametrize("value", [-1, 65, 2.0, None.__class__])
def test_malloc_arenas_are_bounded(value):
    from editserve.server.config import ServeConfig

    with pytest.raises(ValueError, match=r"malloc_arenas must be an integer in \[0, 64\]"):
        ServeConfig(malloc_arenas=value)
    assert ServeConfig().malloc_arenas == 2


def test_malloc_arenas_can_be_capped_and_free_memory_released_here():
    from editserve.server.memory import limit_malloc_arenas, release_free_memory

    assert limit_malloc_arenas(0) is False
    # glibc (Linux, as CI); elsewhere both would answer False and change nothing
    assert limit_malloc_arenas(2) is True
    assert release_free_memory() is True


@pytest.mark.parametrize("field, value", [
    ("vllm_on_edit", "sometimes"),
    ("vllm_on_edit", ""),
    ("vllm_kv_cache_gib", float("nan")),
    ("vllm_kv_cache_gib", 0.0),
    ("vllm_kv_cache_gib", 1e9),
    ("vllm_tensor_parallel_size", 0),
    ("vllm_tensor_parallel_size", 65),
])
def test_vllm_settings_are_bounded(field, value):
    from editserve.server.config import ServeConfig

    with pytest.raises(ValueError, match=field):
        ServeConfig().with_overrides(**{field: value})


def test_vllm_running_requests_keep_their_kv_by_default():
    from editserve.server.config import ServeConfig

    assert ServeConfig().vllm_on_edit == "keep"
    assert ServeConfig().with_overrides(vllm_on_edit="recompute").vllm_on_edit == "recompute"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("decode_products", "fastest", r"decode_products must be one of \['auto', 'plain', 'blocked'\]"),
    ("decode_products", "", "decode_products must be one of"),
    ("lean_decode", "yes", "lean_decode must be true or false"),
    ("lean_decode", 1, "lean_decode must be true or false"),
    ("decode_bf16_min_rows", 17, r"decode_bf16_min_rows must be an integer in \[0, 16\]"),
    ("decode_bf16_min_rows", -1, r"decode_bf16_min_rows must be an integer in \[0, 16\]"),
    ("decode_bf16_min_rows", True, "decode_bf16_min_rows must be an integer"),
    ("decode_bf16_min_rows", 4.0, "decode_bf16_min_rows must be an integer"),
])
def test_decode_path_options_are_checked(field, value, message):
    from editserve.server.config import ServeConfig

    with pytest.raises(ValueError, match=message):
        ServeConfig().with_overrides(**{field: value})
    assert ServeConfig().with_overrides(decode_products="plain", lean_decode=False).decode_products == "plain"
    with pytest.raises(ValueError, match="decode_bf16_min_rows applies to the hf backend"):
        ServeConfig().with_overrides(backend="vllm", decode_bf16_min_rows=8)
    assert ServeConfig().with_overrides(decode_bf16_min_rows=8).decode_bf16_min_rows == 8


def test_an_unknown_decode_products_flag_is_refused():
    from click.testing import CliRunner

    from editserve.client.cli import main

    result = CliRunner().invoke(main, ["serve", "--decode-products", "fastest"])
    assert result.exit_code != 0 and "fastest" in result.output


@pytest.mark.parametrize("value", [1, -1, 10_001, True, 2.5, "3", float("nan")])
def test_the_consolidation_policy_is_bounded(value):
    from editserve.server.config import ServeConfig

    with pytest.raises(ValueError, match=r"consolidate_after must be 0 \(off\) or an integer in \[2, 10000\]"):
        ServeConfig().with_overrides(consolidate_after=value)
    assert ServeConfig().consolidate_after == 0
    assert ServeConfig().with_overrides(consolidate_after=100).consolidate_after == 100


def test_a_bad_consolidation_policy_flag_stops_serve_before_loading():
    from click.testing import CliRunner

    from editserve.client.cli import main

    result = CliRunner().invoke(main, ["serve", "--consolidate-after", "1"])
    assert result.exit_code == 2 and "consolidate_after must be 0 (off)" in result.output
