{
  "targets": [
    {
      "target_name": "bfmig_digest",
      "sources": ["native/digest.c", "native/pageio.c", "native/pagedelta.c", "native/zstd.c"],
      "libraries": ["-lzstd"],
      "defines": ["NAPI_VERSION=8"],
      "cflags!": ["-O0", "-O1", "-O2"],
      "cflags": ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "xcode_settings": {
        "GCC_OPTIMIZATION_LEVEL": "3",
        "OTHER_CFLAGS": ["-std=gnu11"]
      }
    }
  ]
}
