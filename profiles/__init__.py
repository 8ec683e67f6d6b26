"""Reference hardware profiles (`tide profile --list`), installed as the package
`tidecli.profiles`. The package marker lets an editable install (`pip install -e .`) find them."""
