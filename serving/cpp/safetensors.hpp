// safetensors read/write with libtorch and nothing else: an 8-byte little-endian header length, a JSON header
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw bytes
// (row-major, little-endian). https://github.com/huggingface/safetensors#format
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/core/InferenceMode.h>

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "json.hpp"

namespace cu_safetensors {

using Named = std::vector<std::pair<std::string, at::Tensor>>;  // in file order

struct DType { const char* name; at::ScalarType type; };
inline const std::vector<DType>& dtypes() {
  static const std::vector<DType> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  return table;
}

inline at::ScalarType from_name(const std::string& name, const std::string& where) {
  for (const auto& d : dtypes())
    if (name == d.name) return d.type;
  throw std::runtime_error(where + ": unsupported safetensors dtype '" + name + "'");
}

inline const char* to_name(at::ScalarType t) {
  for (const auto& d : dtypes())
    if (t == d.type) return d.name;
  throw std::runtime_error(std::string("cannot write dtype ") + c10::toString(t) + " to safetensors");
}

// Every tensor of the file at `path`, checked: header within the file, offsets inside the data and of the
// size that dtype x shape needs. Errors name the file (and the tensor).
inline Named read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open (expected a .safetensors file of input tensors)");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string bytes = ss.str();
  const std::string bad = path + ": not a readable .safetensors file (";
  if (bytes.size() < 8) throw std::runtime_error(bad + "shorter than its 8-byte header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  if (n > bytes.size() - 8) throw std::runtime_error(bad + "header length " + std::to_string(n) + " runs past the end)");
  cu_json::Value header;
  try {
    header = cu_json::parse(bytes.substr(8, n));
  } catch (const std::exception& e) {
    throw std::runtime_error(bad + "header: " + e.what() + ")");
  }
  if (header.kind != cu_json::Value::Object) throw std::runtime_error(bad + "header is not a JSON object)");
  const size_t data_start = 8 + n, data_size = bytes.size() - data_start;
  Named out;
  for (const auto& kv : header.fields) {
    const std::string& name = kv.first;
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    const cu_json::Value* dt = kv.second.get("dtype");
    const cu_json::Value* shape = kv.second.get("shape");
    const cu_json::Value* offs = kv.second.get("data_offsets");
    if (!dt || dt->kind != cu_json::Value::String || !shape || shape->kind != cu_json::Value::Array || !offs ||
        offs->kind != cu_json::Value::Array || offs->items.size() != 2)
      throw std::runtime_error(where + ": damaged header entry (needs dtype, shape, data_offsets)");
    at::ScalarType type = from_name(dt->str, where);
    std::vector<int64_t> sizes;
    int64_t numel = 1;
    for (const auto& d : shape->items) {
      int64_t s = d.as_int();
      if (s < 0) throw std::runtime_error(where + ": negative dimension");
      sizes.push_back(s);
      numel *= s;
    }
    const int64_t begin = offs->items[0].as_int(), end = offs->items[1].as_int();
    const int64_t need = numel * static_cast<int64_t>(c10::elementSize(type));
    if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_size || end - begin != need)
      throw std::runtime_error(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                               "] do not hold " + std::to_string(need) + " bytes inside the file's " +
                               std::to_string(data_size) + " data bytes (truncated or damaged file)");
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(type));
    if (need) std::memcpy(t.data_ptr(), bytes.data() + data_start + begin, need);
    out.emplace_back(name, t);
  }
  return out;
}

// Write `tensors` to `path` atomically: a temporary file next to it, renamed into place.
inline void write(const std::string& path, const Named& tensors) {
  std::string header = "{";
  int64_t offset = 0;
  std::vector<at::Tensor> dense;
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i].second.to(at::kCPU).contiguous();
    const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
    std::string shape = "[";
    for (int64_t d = 0; d < t.dim(); ++d) shape += (d ? "," : "") + std::to_string(t.size(d));
    header += (i ? "," : "") + cu_json::quote(tensors[i].first) + ":{\"dtype\":\"" + to_name(t.scalar_type()) +
              "\",\"shape\":" + shape + "],\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
    dense.push_back(t);
  }
  header += "}";
  while (header.size() % 8) header += ' ';  // the format allows trailing spaces; aligns the data
  // Hidden temporary in the same folder (the rename is then atomic), fsync, rename: as compiled_unet/_atomic.py.
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string tmp = dir + "." + base + "." + std::to_string(::getpid()) + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot write there (" + std::strerror(errno) + ")");
  uint64_t n = header.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (const auto& t : dense) {
    const size_t nbytes = t.numel() * t.element_size();
    ok = ok && std::fwrite(t.data_ptr(), 1, nbytes, f) == nbytes;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": write failed (" + why + ")");
  }
}

}  // namespace cu_safetensors
