import os

if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of `accelerate launch` / torchrun: bound to the launcher before
    from peftkit.launch import die_with_parent  # the seconds of imports, which a launcher killed in them outlived

    die_with_parent()

from peftkit.cli import main  # noqa: E402

main()
