"""Shared test set-up: slow tests run only with --runslow; compiled programs are cached on disk."""

import os

import pytest

from tpullm.cli import MIN_CACHED_COMPILE_SECONDS

# Slow beyond their marks in place: checks the default run already makes on another model family or
# parameter (it keeps one or two of each), the second of two mesh or process runs of one claim, and
# whole-CLI repeats. `--runslow` (make test-all) runs them; a test file's name alone marks all of it.
SLOW = (
    "test_aot.py::test_aot_compiles_pipeline_and_sequence_axes",
    "test_beam.py::test_beam_search_equals_hugging_face_generate[2--0.5-never]",
    "test_beam.py::test_beam_search_equals_hugging_face_generate[2-0.5-False]",
    "test_beam.py::test_beam_search_equals_hugging_face_generate[3-1.0-False]",
    "test_beam.py::test_beam_search_on_a_mesh_equals_one_device",
    "test_beam.py::test_scores_are_length_normalised_sums_of_logprobs[0.5-False]",
    "test_beam.py::test_scores_are_length_normalised_sums_of_logprobs[1.0-False]",
    "test_beam.py::test_scores_are_length_normalised_sums_of_logprobs[1.5-never]",
    "test_checkpoint_cli.py::test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes",
    "test_eval_cli.py::test_a_bad_eval_task_stops_training_before_the_first_step",
    "test_eval_cli.py::test_a_sweep_scores_every_run_and_plots_the_scores_against_compute",
    "test_eval_cli.py::test_the_harness_command_line_runs_the_tpullm_model",
    "test_eval_cli.py::test_training_logs_task_scores_every_eval_tasks_every_steps",
    "test_eval_multihost.py::test_two_processes_score_like_one",
    "test_generate.py::test_decode_logits_equal_the_full_forward_pass_at_every_position[gpt2]",
    "test_generate.py::test_decode_logits_equal_the_full_forward_pass_at_every_position[mixtral]",
    "test_generate.py::test_decode_logits_equal_the_full_forward_pass_at_every_position[qwen2]",
    "test_generate.py::test_each_row_of_a_batch_gets_what_it_gets_alone[mistral]",
    "test_generate.py::test_greedy_equals_hugging_face_generate[gpt2]",
    "test_generate.py::test_greedy_equals_hugging_face_generate[mistral]",
    "test_generate.py::test_greedy_equals_hugging_face_generate[qwen2]",
    "test_generate.py::test_greedy_with_cache_equals_full_forward_passes[gpt2]",
    "test_generate.py::test_greedy_with_cache_equals_full_forward_passes[mixtral]",
    "test_generate.py::test_greedy_with_cache_equals_full_forward_passes[qwen2]",
    "test_generate.py::test_pipelined_model_generates_like_the_plain_one",
    "test_generate_mesh.py",
    "test_hf_io.py::test_training_starts_from_an_hf_directory_and_its_tokenizer",
    "test_lora.py::test_fresh_adapters_give_the_base_models_logits_exactly[moe]",
    "test_lora.py::test_merged_equals_unmerged[dense]",
    "test_lora.py::test_merged_equals_unmerged[remat_biases]",
    "test_model.py::test_remat_policies_match_no_remat[full]",
    "test_model.py::test_tiny_model_overfits_fixed_batch",
    "test_moe.py::test_dropless_and_capacity_equal_a_per_token_loop[1]",
    "test_moe.py::test_dropped_tokens_pass_through_the_residual",
    "test_moe.py::test_model_sows_per_layer_losses_and_loads[1]",
    "test_moe.py::test_model_sows_per_layer_losses_and_loads[2]",
    "test_moe.py::test_router_jitter_draws_from_the_train_seed",
    "test_moe.py::test_router_jitter_only_with_a_router_rng",
    "test_moe.py::test_train_step_adds_the_weighted_router_losses",
    "test_pipeline.py::test_fsdp_weights_are_gathered_once_per_step",
    "test_pipeline.py::test_mixtral_tiny_pipelined_over_experts_matches_one_device",
    "test_pipeline.py::test_pipelined_moe_sows_each_layers_losses_over_its_microbatches[moe_every=2]",
    "test_pipeline.py::test_pipelined_moe_sows_each_layers_losses_over_its_microbatches[repeats=2]",
    "test_pipeline.py::test_repeats_keep_no_copy_of_the_weights_per_iteration",
    "test_speculative.py::test_greedy_batch_equals_the_targets_greedy_output_row_for_row[gpt2]",
    "test_speculative.py::test_greedy_batch_equals_the_targets_greedy_output_row_for_row[mistral]",
    "test_speculative.py::test_greedy_batch_equals_the_targets_greedy_output_row_for_row[mixtral]",
    "test_speculative.py::test_sampled_tokens_follow_the_targets_distribution[llama-sampling0]",
    "test_speculative.py::test_sampled_tokens_follow_the_targets_distribution[mistral-sampling1]",
    "test_speculative.py::test_several_tokens_decoded_at_once_and_rewound_equal_the_full_forward_pass[mistral]",
)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with --runslow")
    # jax's persistent compilation cache, in pytest's cache directory (.pytest_cache; --cache-clear
    # empties it). jax reads these variables when imported, which happens after this hook, and the
    # commands the tests start inherit them.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(config.cache.mkdir("jax_compilation_cache")))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_CACHED_COMPILE_SECONDS))
    # Tests never download: evaluation tasks read the local files the tests write.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        name = item.nodeid.removeprefix("tests/")
        if "slow" in item.keywords or name in SLOW or name.split("::")[0] in SLOW:
            item.add_marker(skip)
