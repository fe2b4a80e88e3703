from stages.app import app

app(prog_name="dret")
