// The code books of quantized states and their bucket tables (types.hpp, QuantMap),
// built once when the library loads. The values and thresholds are those of
// fastadam.reference.quant_map and quant_thresholds (tests/test_quantized.py compares).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "fastadam/types.hpp"

namespace fastadam {
namespace {

std::uint32_t bits_of(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
float float_of(std::uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// The values: the dynamic map (Dettmers et al.) as exact fractions, each the float nearest
// the double quotient; 4 bits unsigned: k/16 (torchao's linear map without zero). `run`:
// for each value, the run of evenly spaced values it belongs to (a decade of the dynamic
// map; 0 and 1 alone), for the vector estimate's pieces.
std::vector<float> map_values(int bits, bool is_signed, std::vector<int>* run) {
    struct Value {
        double key;
        float value;
        int run;
    };
    std::vector<Value> out;
    if (bits == 4 && !is_signed) {
        for (int k = 1; k <= 16; ++k) out.push_back({k / 16.0, static_cast<float>(k / 16.0), 0});
    } else {
        const int exponents = bits == 8 ? 7 : 3;
        out.push_back({0.0, 0.0f, 0});
        out.push_back({1.0, 1.0f, exponents + 1});
        for (int i = 0; i < exponents; ++i) {
            const std::int64_t n = (std::int64_t{1} << (i + bits - 1 - exponents)) * (is_signed ? 1 : 2);
            std::int64_t scale = 1;
            for (int e = 0; e < exponents - 1 - i; ++e) scale *= 10;
            for (std::int64_t k = 0; k < n; ++k) {
                const double num = static_cast<double>(2 * n + 9 * (2 * k + 1)), den = static_cast<double>(20 * n * scale);
                out.push_back({num / den, static_cast<float>(num / den), i + 1});
                if (is_signed) out.push_back({-num / den, static_cast<float>(-num / den), -(i + 1)});
            }
        }
    }
    std::sort(out.begin(), out.end(), [](const Value& a, const Value& b) { return a.key < b.key; });
    std::vector<float> values;
    for (const Value& v : out) {
        values.push_back(v.value);
        run->push_back(v.run);
    }
    if (values.size() != (std::size_t{1} << bits)) throw std::logic_error("fastadam: a code book of the wrong size");
    return values;
}

struct Built {
    QuantMap map;
    std::vector<std::uint32_t> buckets;
};

// |x|'s bit patterns of magnitude bucket mb (QuantMap): [lo, hi].
std::pair<std::uint32_t, std::uint32_t> magnitudes(const QuantMap& q, std::int32_t mb) {
    const auto base = static_cast<std::uint32_t>(q.magnitude_base);
    if (mb == 0) return {0u, base - 1u};
    if (mb == q.top) return {0x3f800000u, 0x7f800000u};  // 1.0 to inf
    const std::uint32_t lo = base + (static_cast<std::uint32_t>(mb - 1) << q.shift);
    return {lo, lo + (1u << q.shift) - 1u};
}

// Tries buckets of 2^bucket_bits per binade; false if one would hold two thresholds.
bool fill_buckets(Built& b, int bucket_bits) {
    QuantMap& q = b.map;
    const int thresholds = (1 << q.bits) - 1;
    const auto code_of = [&](float x) {
        return static_cast<std::uint32_t>(std::upper_bound(q.thresholds, q.thresholds + thresholds, x) - q.thresholds);
    };
    std::int32_t lowest_exponent = 255;
    for (int j = 0; j < thresholds; ++j)
        lowest_exponent = std::min<std::int32_t>(lowest_exponent, static_cast<std::int32_t>((bits_of(q.thresholds[j]) >> 23) & 0xffu));
    q.magnitude_base = lowest_exponent << 23;
    q.shift = 23 - bucket_bits;
    q.top = ((127 - lowest_exponent) << bucket_bits) + 1;
    q.negative_buckets = q.is_signed ? q.top + 1 : 1;
    q.bucket_count = q.negative_buckets + q.top + 1;
    const std::uint32_t mask = (1u << q.shift) - 1u, none = 1u << q.shift;
    b.buckets.assign(static_cast<std::size_t>(q.bucket_count), 0);
    for (std::int32_t idx = 0; idx < q.bucket_count; ++idx) {
        const bool negative = idx < q.negative_buckets;
        const std::int32_t mb = negative ? q.negative_buckets - 1 - idx : idx - q.negative_buckets;
        auto [a_lo, a_hi] = magnitudes(q, mb);
        if (negative && !q.is_signed) a_lo = 0, a_hi = 0x7f800000u;  // every negative x: code 0
        const float lo = negative ? -float_of(a_hi) : float_of(a_lo), hi = negative ? -float_of(a_lo) : float_of(a_hi);
        const std::uint32_t code = code_of(lo), inside = code_of(hi) - code;
        std::uint32_t key = none;
        if (inside > 1) return false;
        if (inside == 1) {
            // the low bits are ordered as x only inside one binade's bucket
            if (mb == 0 || mb == q.top || (negative && !q.is_signed)) return false;
            const std::uint32_t low = bits_of(q.thresholds[code]) & mask;
            key = negative ? mask - low : low;
        }
        b.buckets[static_cast<std::size_t>(idx)] = code | key << 8;
    }
    return true;
}

// The pieces of the vector estimate (types.hpp, QuantMap): runs of evenly spaced values
// at or above zero, each with the junction threshold below its first value.
void fill_pieces(QuantMap& q, const std::vector<int>& run) {
    const int n = 1 << q.bits;
    int first = 0;  // the first value >= 0
    while (q.values[first] < 0.0f) ++first;
    q.zero_code = first;  // thresholds below zero: one below each negative value's successor
    // positive-side threshold k lies between values first + k and first + k + 1
    const auto t = [&](int k) { return static_cast<double>(q.thresholds[first + k]); };
    const int top_value = n - 1 - first;  // positive-side values 0..top_value
    struct Piece {
        double junction;  // E steps to `lo` here (0 for the first piece)
        int lo, hi;       // E within the piece
    };
    std::vector<Piece> pieces;
    for (int f = 0, l = 0; f <= top_value; f = l + 1) {
        for (l = f; l + 1 <= top_value && run[first + l + 1] == run[first + f];) ++l;
        pieces.push_back({f == 0 ? 0.0 : t(f - 1), f, l});
    }
    // E = floor(lo + 1 + (|x| - t(lo)) / delta) inside a piece needs the junction within one
    // spacing of the first internal threshold (the dynamic map's are 0.8 of one away); a
    // piece farther than that is split in a constant piece and the rest.
    const auto spacing = [&](const Piece& c, double next_junction) {
        const int internal = c.hi - c.lo;  // thresholds t(lo) .. t(hi - 1) inside the piece
        return internal >= 2 ? (t(c.hi - 1) - t(c.lo)) / (internal - 1) : next_junction - t(c.lo);
    };
    std::vector<Piece> split;
    for (std::size_t p = 0; p < pieces.size(); ++p) {
        const Piece& c = pieces[p];
        const double next = p + 1 < pieces.size() ? pieces[p + 1].junction : t(c.hi - 1) + 1.0;
        if (c.hi > c.lo && t(c.lo) - c.junction > spacing(c, next) * (1 + 1e-6)) {
            split.push_back({c.junction, c.lo, c.lo});
            split.push_back({t(c.lo), c.lo + 1, c.hi});
        } else {
            split.push_back(c);
        }
    }
    if (split.size() > 16) throw std::logic_error("fastadam: a code book with more than 16 pieces");
    for (std::size_t p = 0; p < split.size(); ++p) {
        const Piece& c = split[p];
        double scale = 0.0, offset = c.lo + 0.5;
        if (c.hi > c.lo) {
            const double delta = spacing(c, p + 1 < split.size() ? split[p + 1].junction : t(c.hi - 1) + 1.0);
            if (t(c.lo) - c.junction > delta * (1 + 1e-6)) throw std::logic_error("fastadam: a piece's junction is too far from its grid");
            scale = 1.0 / delta;
            offset = c.lo + 1 - t(c.lo) / delta;
        }
        q.piece_scale[p] = static_cast<float>(scale);
        q.piece_offset[p] = static_cast<float>(offset);
        q.piece_top[p] = c.hi;
    }
    // Binades: index 0 below 2^(binade_base + 1 - 127), which no junction is; 31 from 2^(binade_base + 31 - 127).
    double lowest = 1.0;
    for (std::size_t p = 1; p < split.size(); ++p) lowest = std::min(lowest, split[p].junction);
    q.binade_base = static_cast<std::int32_t>((bits_of(static_cast<float>(lowest)) >> 23) & 0xffu) - 1;
    // the bounded loop (|x| < 2) reads binade indices up to 127 - binade_base without a clamp
    if (q.binade_base < 96) throw std::logic_error("fastadam: a code book's binades reach past 31 below 2");
    if (split.back().junction >= std::ldexp(1.0, q.binade_base + 31 - 127)) throw std::logic_error("fastadam: junctions past the binades");
    for (int idx = 0; idx < 32; ++idx) {
        const double lo = idx == 0 ? 0.0 : std::ldexp(1.0, q.binade_base + idx - 127);
        const double hi = idx == 31 ? INFINITY : std::ldexp(1.0, q.binade_base + idx + 1 - 127);
        int piece = 0;
        while (piece + 1 < static_cast<int>(split.size()) && split[piece + 1].junction <= lo) ++piece;
        q.binade_piece[idx] = piece;
        q.binade_junction[idx] = INFINITY;
        if (piece + 1 < static_cast<int>(split.size()) && split[piece + 1].junction < hi) {
            if (piece + 2 < static_cast<int>(split.size()) && split[piece + 2].junction < hi)
                throw std::logic_error("fastadam: two junctions in one binade");
            q.binade_junction[idx] = static_cast<float>(split[piece + 1].junction);
        }
    }
}

Built build(int bits, bool is_signed) {
    Built b;
    QuantMap& q = b.map;
    q.bits = bits;
    q.is_signed = is_signed;
    std::vector<int> run;
    const std::vector<float> values = map_values(bits, is_signed, &run);
    std::copy(values.begin(), values.end(), q.values);
    const int n = 1 << bits;
    for (int j = 0; j + 1 < n; ++j) {
        // the smallest float at or above the exact midpoint (ties go to the larger code)
        const double mid = (static_cast<double>(values[j]) + static_cast<double>(values[j + 1])) / 2.0;
        float t = static_cast<float>(mid);
        if (static_cast<double>(t) < mid) t = std::nextafter(t, INFINITY);
        q.thresholds[j] = t;
    }
    for (int j = n - 1; j < 256; ++j) q.thresholds[j] = INFINITY;
    fill_pieces(q, run);
    for (int bucket_bits = 1; bucket_bits <= 16; ++bucket_bits)
        if (fill_buckets(b, bucket_bits)) return b;
    throw std::logic_error("fastadam: no bucket table for a code book");
}

// Built when the library loads (as dispatch.cpp's statics: no first use inside a step).
struct Books {
    Built book[4] = {build(8, true), build(8, false), build(4, true), build(4, false)};
    Books() {
        for (Built& b : book) b.map.buckets = b.buckets.data();
    }
};
const Books g_books;

}  // namespace

const QuantMap& quant_map(int bits, bool is_signed) {
    if (bits != 8 && bits != 4) throw std::invalid_argument("fastadam: quantized states have 8 or 4 bits a code");
    return g_books.book[(bits == 4 ? 2 : 0) + (is_signed ? 0 : 1)].map;
}

}  // namespace fastadam
