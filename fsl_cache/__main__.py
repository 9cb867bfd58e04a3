from .cli import main

main(prog_name="fsl-cache")
