/* Stand-in for miniaudio.h, written for so8t-export's `make ollama-e2e`; not derived from miniaudio.
 *
 * The Go module zip of github.com/ollama/ollama@v0.24.0 leaves out llama/llama.cpp/vendor/, so
 * llama/llama.cpp/tools/mtmd/mtmd-helper.cpp cannot find "miniaudio/miniaudio.h". That file only decodes audio
 * input for multimodal projectors (decode_audio_from_buf); a text model never reaches it. This header declares
 * just the names it uses, and every decoder call fails, so audio input is reported as undecodable and nothing
 * else changes. mtmd-helper.cpp defines MA_API as `static` before including us. */
#ifndef SO8T_MINIAUDIO_STUB_H
#define SO8T_MINIAUDIO_STUB_H

#include <stddef.h>

#ifndef MA_API
#define MA_API static
#endif

typedef unsigned long long ma_uint64;
typedef unsigned int ma_uint32;
typedef int ma_result;

#define MA_SUCCESS 0
#define MA_NOT_IMPLEMENTED (-29) /* any non-zero value; mtmd-helper only compares with MA_SUCCESS */

typedef enum { ma_format_unknown = 0, ma_format_f32 = 5 } ma_format;

typedef struct {
    ma_format format;
    ma_uint32 channels;
    ma_uint32 sampleRate;
} ma_decoder_config;

typedef struct {
    int unused;
} ma_decoder;

MA_API ma_decoder_config ma_decoder_config_init(ma_format format, ma_uint32 channels, ma_uint32 sample_rate) {
    ma_decoder_config config;
    config.format = format;
    config.channels = channels;
    config.sampleRate = sample_rate;
    return config;
}

MA_API ma_result ma_decoder_init_memory(const void *data, size_t size, const ma_decoder_config *config,
                                        ma_decoder *decoder) {
    (void)data;
    (void)size;
    (void)config;
    (void)decoder;
    return MA_NOT_IMPLEMENTED;
}

MA_API ma_result ma_decoder_get_length_in_pcm_frames(ma_decoder *decoder, ma_uint64 *length) {
    (void)decoder;
    *length = 0;
    return MA_NOT_IMPLEMENTED;
}

MA_API ma_result ma_decoder_read_pcm_frames(ma_decoder *decoder, void *frames, ma_uint64 frame_count,
                                            ma_uint64 *frames_read) {
    (void)decoder;
    (void)frames;
    (void)frame_count;
    *frames_read = 0;
    return MA_NOT_IMPLEMENTED;
}

MA_API ma_result ma_decoder_uninit(ma_decoder *decoder) {
    (void)decoder;
    return MA_SUCCESS;
}

#endif
