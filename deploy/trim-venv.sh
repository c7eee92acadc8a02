#!/bin/sh
# Takes out of the image's virtual environment what the running daemon never reads (Containerfile, build
# stages; README "Run in containers" has the figures). Then imports what it trimmed, so a bad trim fails the
# build instead of the container.
set -eu
venv="$1"
site="$(echo "$venv"/lib/python3*/site-packages)"
# Debug symbols and symbol tables the dynamic linker does not use (mostly PyAV's modules). strip breaks some
# libraries auditwheel's patchelf rewrote ("ELF load command address/offset not page-aligned", numpy's
# OpenBLAS): each stripped file must still load, else it is put back as it came.
kept=0
for lib in $(find "$site" -type f -name '*.so*'); do
    cp -p "$lib" "$lib.unstripped"
    if strip --strip-unneeded "$lib" 2>/dev/null &&
            "$venv/bin/python" -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$lib" 2>/dev/null; then
        rm "$lib.unstripped"
    else
        mv "$lib.unstripped" "$lib"
        kept=$((kept + 1))
    fi
done
echo "trim-venv: $kept libraries left unstripped (they would not load stripped)"
# Test suites shipped inside packages (numpy's are 17 MiB) and their byte code.
find "$site" -depth -type d -name tests -not -path '*/heygem_daemon/*' -exec rm -rf {} +
# botocore's API models of about 450 AWS services (27 MiB): the daemon's only client is S3; STS, SSO and sign-in
# are what botocore's credential providers call (assumed roles, web identity, SSO and login profiles).
for model in "$site"/botocore/data/*/; do
    case "$(basename "$model")" in s3|sts|sso|sso-oidc|signin) ;; *) rm -rf "$model" ;; esac
done
"$venv/bin/python" - <<'PY'
import av, boto3, cv2, numpy, PIL.Image, yaml
import heygem_daemon.cli
boto3.session.Session(region_name="us-east-1").client("s3")
boto3.session.Session(region_name="us-east-1").client("sts")
assert cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml").empty() is False
numpy.linalg.inv(numpy.eye(3))
with av.open("/tmp/trim-check.mp4", "w") as out:  # libx264 from PyAV's FFmpeg, after the strip
    stream = out.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    frame = av.VideoFrame.from_ndarray(numpy.zeros((64, 64, 3), numpy.uint8), format="rgb24")
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
PY
rm -f /tmp/trim-check.mp4
