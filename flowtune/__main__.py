"""``python -m flowtune`` (used by ``accelerate launch -m flowtune``)."""

from flowtune.cli import main

main()
