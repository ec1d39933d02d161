// build_info.cpp: which torch this library was compiled against, as a marker string in the binary.
// An extension built against one torch and imported with another usually fails in the dynamic
// loader (undefined symbols), before any code of ours runs; fused_bptt/_ops.py then reads this
// marker from the file's bytes to say "built against torch X, running torch Y" instead of a bare
// loader error. setup.py defines FUSED_BPTT_BUILD_INFO_CHARS as the character codes of
// "fused_bptt built against torch <torch.__version__>".
#ifndef FUSED_BPTT_BUILD_INFO_CHARS
#error "FUSED_BPTT_BUILD_INFO_CHARS is defined by setup.py"
#endif

// `used` and default visibility keep the array in the library even though nothing references it.
extern "C" __attribute__((used, visibility("default")))
const char fused_bptt_build_info[] = {FUSED_BPTT_BUILD_INFO_CHARS, '\0'};
