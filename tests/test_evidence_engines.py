"""BENCHMARKS.md section 15's table (`rlsd.experiments.evidence_engines`): medians and ratios to the in-trainer
teacher rendered from `benchmarks/served-teacher/results.json`."""

from __future__ import annotations

import json

from rlsd.experiments.evidence_engines import SERVED_TEACHER, render_served_teacher


def test_served_teacher_table_renders_ratios_to_the_in_trainer_teacher(tmp_path):
    """Step 0.3 / 0.2 = 1.50, teacher pass 0.05 / 0.02 = 2.50, fixed-batch pass 0.04 / 0.02 = 2.00."""
    assert render_served_teacher(tmp_path).startswith("No run yet")
    result = {
        "step_medians": {"trainer": {"step_s": 0.2, "teacher_s": 0.02}, "vllm": {"step_s": 0.3, "teacher_s": 0.05}},
        "fixed_batch": {"pass_s_median": {"trainer": 0.02, "vllm": 0.04}, "tokens": 10, "logp_gap_max": 0.005,
                        "logp_gap_mean": 0.001},
        "settings": {"measured_steps_per_backend": 5, "warmup_steps": 2, "measured_passes_per_backend": 7,
                     "warmup_passes": 2, "model": "tiny", "batch": 4, "max_completion_length": 8},
        "versions": {"vllm": "0.31.0", "torch": "2.13.0"}, "engine_start_s": 40.0, "wall_s": 50.0,
        "provenance": {"commit": "a" * 40, "commit_dirty": False, "cpu_model": "CPU", "torch_threads": 1,
                       "command_line": "python run.py", "omp_num_threads": "1"},
    }  # fmt: skip
    path = tmp_path / SERVED_TEACHER
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))
    lines = render_served_teacher(tmp_path).splitlines()
    assert lines[2] == '| in-trainer (`teacher_backend="trainer"`) | 0.200 | 0.020 | 0.020 | 1.00 | 1.00 | 1.00 |'
    assert lines[3] == '| served (`teacher_backend="vllm"`) | 0.300 | 0.050 | 0.040 | 1.50 | 2.50 | 2.00 |'
    assert "max gap 0.0050" in lines[5] and "commit aaaaaaa" in lines[5] and "`python run.py`" in lines[5]
