#!/bin/sh
# py-spy a proxyd worker under the rps-1k wrk load and print the top functions.
#   bench/profile.sh [--duration S] [--profile-rate HZ] [--profile-top N]
# Installs py-spy with pip if it is missing. Same as `bench/run --profile`.
exec python3 "$(dirname "$0")/run.py" --profile "$@"
