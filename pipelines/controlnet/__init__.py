"""ControlNet units as sd-webui-controlnet runs them: models (`models.py`), preprocessors
without weights (`preprocessors.py`) and with them (`annotators.py`: depth_midas, with
`midas_original.py` reading the extension's MiDaS file) and the unit step of a generation
run (`units.py`):
each unit's ControlNet residuals, scaled by its weight and control mode, added to the UNet's
skip connections for the steps between its guidance start and end."""
