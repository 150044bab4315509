// SecureServer / SecureClient over tcp loopback: authentication by the ZAP
// allow-list, runtime allow/revoke, malformed frames, a 64 MiB payload.
#include <gtest/gtest.h>
#include <zmq.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "actors/transport/envelope.h"
#include "actors/transport/keys.h"
#include "actors/transport/socket.h"

namespace troupe::transport {
namespace {

using namespace std::chrono_literals;

constexpr int kHandshakeMs = 5000;
// How long a test waits to be sure that nothing arrives.
constexpr int kQuietMs = 700;

KeyPair NewKeys() {
  auto kp = GenerateKeyPair();
  EXPECT_TRUE(kp.ok()) << kp.status().message();
  return kp.value();
}
std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

// Polls `pred` for up to 5 s.
template <class Pred>
bool Eventually(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

class SocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_keys_ = NewKeys();
    client_keys_ = NewKeys();
    auto s = SecureServer::Bind("tcp://127.0.0.1:0", server_keys_, {client_keys_.public_key});
    ASSERT_TRUE(s.ok()) << s.status().message();
    server_ = std::move(s).value();
    ASSERT_NE(server_->endpoint().find("tcp://127.0.0.1:"), std::string::npos);
    ASSERT_EQ(server_->endpoint().find(":0"), std::string::npos) << server_->endpoint();
  }
  std::unique_ptr<SecureClient> Connect(const KeyPair& keys) {
    auto c = SecureClient::Connect(server_->endpoint(), server_keys_.public_key, keys);
    EXPECT_TRUE(c.ok()) << c.status().message();
    return c.ok() ? std::move(c).value() : nullptr;
  }
  // Receives one frame on the server, failing the test on timeout.
  Incoming ServerReceive(int timeout_ms = kHandshakeMs) {
    auto in = server_->Receive(timeout_ms);
    EXPECT_TRUE(in.ok()) << in.status().message();
    EXPECT_TRUE(in.ok() && in->has_value()) << "nothing received";
    return in.ok() && in->has_value() ? std::move(**in) : Incoming{};
  }
  void ExpectServerQuiet() {
    auto in = server_->Receive(kQuietMs);
    ASSERT_TRUE(in.ok()) << in.status().message();
    EXPECT_FALSE(in->has_value()) << "a refused client got a frame through";
  }

  KeyPair server_keys_, client_keys_;
  std::unique_ptr<SecureServer> server_;
};

TEST_F(SocketTest, AllowedClientTalksBothWays) {
  auto client = Connect(client_keys_);
  ASSERT_TRUE(client);
  ASSERT_TRUE(client->WaitForHandshake(kHandshakeMs).ok());
  ASSERT_TRUE(client->Send(300, Bytes("ping")).ok());
  Incoming in = ServerReceive();
  EXPECT_EQ(in.frame.type, 300);
  EXPECT_EQ(in.frame.payload, Bytes("ping"));
  EXPECT_EQ(in.peer_public_key, client_keys_.public_key);
  ASSERT_TRUE(server_->Send(in.peer, 301, Bytes("pong")).ok());
  auto back = client->Receive(kHandshakeMs);
  ASSERT_TRUE(back.ok() && back->has_value());
  EXPECT_EQ((*back)->type, 301);
  EXPECT_EQ((*back)->payload, Bytes("pong"));
  // Empty payloads and the zero-copy overload.
  ASSERT_TRUE(client->Send(302, std::vector<uint8_t>{}).ok());
  EXPECT_TRUE(ServerReceive().frame.payload.empty());
  EXPECT_EQ(server_->refused_count(), 0u);
  EXPECT_EQ(server_->malformed_count(), 0u);
}

TEST_F(SocketTest, ClientKeyNotInAllowListIsRefused) {
  std::atomic<int> handler_calls{0};
  server_->SetRefusalHandler([&](const Refusal& r) {
    if (!r.public_key.empty()) ++handler_calls;
  });
  const KeyPair stranger = NewKeys();
  auto client = Connect(stranger);
  ASSERT_TRUE(client);
  ASSERT_TRUE(client->Send(300, Bytes("let me in")).ok());  // queued, never delivered
  const Status hs = client->WaitForHandshake(kHandshakeMs);
  EXPECT_FALSE(hs.ok());
  EXPECT_NE(hs.message().find("refused"), std::string::npos) << hs.message();
  ExpectServerQuiet();
  EXPECT_GE(server_->refused_count(), 1u);
  EXPECT_EQ(server_->last_refused_key(), stranger.public_key);
  EXPECT_GE(handler_calls.load(), 1);
}

TEST_F(SocketTest, ClientWithoutCurveIsRefused) {
  void* ctx = zmq_ctx_new();
  void* raw = zmq_socket(ctx, ZMQ_DEALER);
  int linger = 0;
  zmq_setsockopt(raw, ZMQ_LINGER, &linger, sizeof(linger));
  ASSERT_EQ(zmq_connect(raw, server_->endpoint().c_str()), 0);
  const auto frame = EncodeFrame(300, Bytes("plaintext"));
  zmq_send(raw, frame.data(), frame.size(), ZMQ_DONTWAIT);
  ExpectServerQuiet();
  EXPECT_TRUE(Eventually([&] { return server_->refused_count() >= 1; }));
  zmq_close(raw);
  zmq_ctx_term(ctx);
}

TEST_F(SocketTest, WrongServerKeyFailsHandshake) {
  auto c = SecureClient::Connect(server_->endpoint(), NewKeys().public_key, client_keys_);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE((*c)->WaitForHandshake(kHandshakeMs).ok());
  ExpectServerQuiet();
}

TEST_F(SocketTest, AllowClientAtRuntimeAdmitsNewKey) {
  const KeyPair late = NewKeys();
  auto first = Connect(late);
  ASSERT_FALSE(first->WaitForHandshake(kHandshakeMs).ok());
  ASSERT_TRUE(server_->AllowClient(late.public_key).ok());
  EXPECT_FALSE(server_->AllowClient("not a key").ok());
  // libzmq does not retry a refused handshake: a new client gets through.
  auto second = Connect(late);
  ASSERT_TRUE(second->WaitForHandshake(kHandshakeMs).ok());
  ASSERT_TRUE(second->Send(310, Bytes("hello")).ok());
  Incoming in = ServerReceive();
  EXPECT_EQ(in.frame.payload, Bytes("hello"));
  EXPECT_EQ(in.peer_public_key, late.public_key);
}

TEST_F(SocketTest, RevokeClient) {
  auto client = Connect(client_keys_);
  ASSERT_TRUE(client->WaitForHandshake(kHandshakeMs).ok());
  ASSERT_TRUE(client->Send(300, Bytes("before")).ok());
  const Incoming in = ServerReceive();
  server_->RevokeClient(client_keys_.public_key);
  EXPECT_TRUE(server_->allowed_clients().empty());
  // The open connection: its frames are dropped, and we do not send to it.
  ASSERT_TRUE(client->Send(300, Bytes("after")).ok());
  ExpectServerQuiet();
  EXPECT_GE(server_->revoked_drop_count(), 1u);
  EXPECT_TRUE(server_->Send(in.peer, 301, Bytes("x")).IsInvalidArgument());
  // New connections with the key are refused.
  auto again = Connect(client_keys_);
  EXPECT_FALSE(again->WaitForHandshake(kHandshakeMs).ok());
  EXPECT_GE(server_->refused_count(), 1u);
}

TEST_F(SocketTest, MalformedFramesFromAllowedClientAreCountedAndSkipped) {
  // A raw CURVE DEALER with an allowed key, sending garbage.
  void* ctx = zmq_ctx_new();
  void* raw = zmq_socket(ctx, ZMQ_DEALER);
  int linger = 0;
  zmq_setsockopt(raw, ZMQ_LINGER, &linger, sizeof(linger));
  zmq_setsockopt(raw, ZMQ_CURVE_SERVERKEY, server_keys_.public_key.c_str(), 41);
  zmq_setsockopt(raw, ZMQ_CURVE_PUBLICKEY, client_keys_.public_key.c_str(), 41);
  zmq_setsockopt(raw, ZMQ_CURVE_SECRETKEY, client_keys_.secret_key.c_str(), 41);
  ASSERT_EQ(zmq_connect(raw, server_->endpoint().c_str()), 0);
  auto bad_crc = EncodeFrame(300, Bytes("payload"));
  bad_crc.back() ^= 1;
  zmq_send(raw, "garbage", 7, 0);                                 // 1 part, not a frame
  zmq_send(raw, bad_crc.data(), bad_crc.size(), 0);               // checksum mismatch
  zmq_send(raw, bad_crc.data(), kFrameHeaderBytes, ZMQ_SNDMORE);  // 2 parts, bad CRC
  zmq_send(raw, bad_crc.data() + kFrameHeaderBytes, bad_crc.size() - kFrameHeaderBytes, 0);
  zmq_send(raw, "a", 1, ZMQ_SNDMORE);  // 3 parts
  zmq_send(raw, "b", 1, ZMQ_SNDMORE);
  zmq_send(raw, "c", 1, 0);
  zmq_send(raw, "", 0, 0);  // empty
  const auto good = EncodeFrame(301, Bytes("good"));
  zmq_send(raw, good.data(), good.size(), 0);  // 1 part, valid
  Incoming in = ServerReceive();
  EXPECT_EQ(in.frame.type, 301);
  EXPECT_EQ(in.frame.payload, Bytes("good"));
  EXPECT_EQ(server_->malformed_count(), 5u);
  zmq_close(raw);
  zmq_ctx_term(ctx);
}

TEST_F(SocketTest, LargePayloadArrivesIntact) {
  constexpr size_t kBytes = 64u << 20;  // 64 MiB
  std::vector<uint8_t> payload(kBytes);
  std::mt19937_64 rng(11);
  for (size_t i = 0; i < kBytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(payload.data() + i, &v, 8);
  }
  const std::vector<uint8_t> expected = payload;
  auto client = Connect(client_keys_);
  ASSERT_TRUE(client->WaitForHandshake(kHandshakeMs).ok());
  ASSERT_TRUE(client->Send(320, std::move(payload)).ok());  // zero-copy path
  Incoming in = ServerReceive(30000);
  ASSERT_EQ(in.frame.payload.size(), kBytes);
  EXPECT_TRUE(in.frame.payload == expected);
  ASSERT_TRUE(server_->Send(in.peer, 321, std::span<const uint8_t>(in.frame.payload)).ok());  // copy path
  auto back = client->Receive(30000);
  ASSERT_TRUE(back.ok() && back->has_value());
  EXPECT_TRUE((*back)->payload == expected);
}

TEST_F(SocketTest, SendToUnknownPeerIsNotFound) {
  EXPECT_TRUE(server_->Send("no-such-peer", 1, Bytes("x")).IsNotFound());
}

TEST(SocketErrors, BadArgumentsAreErrorsNotCrashes) {
  const KeyPair k = NewKeys();
  EXPECT_TRUE(SecureServer::Bind("tcp://127.0.0.1:0", KeyPair{k.public_key, "short"}, {}).status().IsInvalidArgument());
  EXPECT_TRUE(SecureServer::Bind("tcp://127.0.0.1:0", k, {"bogus"}).status().IsInvalidArgument());
  EXPECT_TRUE(SecureServer::Bind("bogus://x", k, {}).status().IsIOError());
  TransportOptions no_domain;
  no_domain.zap_domain = "";
  EXPECT_TRUE(SecureServer::Bind("tcp://127.0.0.1:0", k, {}, no_domain).status().IsInvalidArgument());
  EXPECT_TRUE(SecureClient::Connect("tcp://127.0.0.1:1", "bogus", k).status().IsInvalidArgument());
  // Two servers in one process: each has its own context and ZAP handler.
  auto a = SecureServer::Bind("tcp://127.0.0.1:0", k, {});
  auto b = SecureServer::Bind("tcp://127.0.0.1:0", k, {});
  EXPECT_TRUE(a.ok() && b.ok());
  // The same port twice is an IOError.
  if (a.ok()) {
    EXPECT_TRUE(SecureServer::Bind((*a)->endpoint(), k, {}).status().IsIOError());
  }
}

TEST(SocketShutdown, UnsentMessagesNeverHangDestruction) {
  const KeyPair k = NewKeys();
  const auto start = std::chrono::steady_clock::now();
  {
    // Nobody listens on port 1: the frame stays queued until linger expires.
    auto c = SecureClient::Connect("tcp://127.0.0.1:1", k.public_key, k);
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE((*c)->Send(1, Bytes("into the void")).ok());
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
}

}  // namespace
}  // namespace troupe::transport
