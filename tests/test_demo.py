"""The demo's stage commands are valid for the scripts they call, and chain outputs to inputs."""
import importlib

from nanorlhf import cli, demo


def test_every_demo_stage_parses_with_its_script():
    stages = dict(demo.stages("/o", "/d", 0.5, "smollm2"))
    assert list(stages) == ["sft", "rm", "ppo", "dpo", "kto"]
    for name, argv in stages.items():
        script = importlib.import_module(argv[0].removesuffix(".py"))
        args = cli.parse(script.Args, argv[1:])  # an unknown flag or a bad value exits here
        assert args.out == f"/o/{name}" and args.max_steps >= 1
    assert cli.parse(importlib.import_module("train_ppo").Args, stages["ppo"][1:]).rm == ["/o/rm"]
    for name in ("rm", "ppo", "dpo", "kto"):  # every later stage starts from the SFT output
        argv = stages[name]
        assert argv[argv.index("--actor" if name == "ppo" else "--model") + 1] == "/o/sft"
