from scratch
copy a /a
env A=1
